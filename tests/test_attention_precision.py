"""Low precision and gradients, with flash-attention's tolerance rule.

The error of S2-Attn in a dtype vs the fp64 reference must be within a small multiple of the error plain
PyTorch makes at that dtype on the same problem (a dense masked SDPA in that dtype vs the same fp64
reference), plus a tiny absolute floor for the case where PyTorch's own error happens to be ~0.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import attention_module, padding_mask_4d, random_qkv
from reference import document_mask, reference_attention

from hf_longlora import s2_attention_forward

MULTIPLE = 2.0
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def dense_s2_in_dtype(q, k, v, docs, group, heads):
    """Plain PyTorch at the test dtype: one masked SDPA call with the reference mask."""
    batch, _, length, _ = q.shape
    mask = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for b, row in enumerate(docs):
        for positions in row:
            idx = torch.tensor(positions)
            for h in range(heads):
                m = document_mask(len(positions), group, shifted=h >= heads - heads // 2)
                mask[b, h][idx[:, None], idx[None, :]] = m
    empty = ~mask.any(-1, keepdim=True)
    mask = mask | (empty & torch.eye(length, dtype=torch.bool))
    rep = heads // k.shape[1]
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask
    )
    return out.transpose(1, 2).masked_fill(empty.squeeze(-1).transpose(1, 2)[..., None], 0.0)


CASES = [
    # (batch, heads, kv_heads, length, head_dim, group, padded lengths or None)
    (1, 8, 2, 256, 64, 64, None),
    (2, 9, 3, 150, 32, 32, [150, 97]),
    (3, 4, 4, 77, 16, 12, [77, 50, 9]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}L{c[3]}D{c[4]}G{c[5]}")
def test_forward_and_gradients_within_pytorch_error(dtype, case):
    batch, heads, kv_heads, length, head_dim, group, lengths = case
    module = attention_module(heads, kv_heads, head_dim, s2_group_size=group)
    q64, k64, v64 = random_qkv(batch, heads, kv_heads, length, head_dim, requires_grad=True, seed=length)
    if lengths is None:
        mask, docs = None, [[list(range(length))]] * batch
    else:
        mask, docs = padding_mask_4d(lengths, length, "right")
    ref = reference_attention(q64, k64, v64, docs, group_size=group)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)

    def low(t):
        return t.detach().to(dtype).requires_grad_(True)

    ql, kl, vl = low(q64), low(k64), low(v64)
    ours = s2_attention_forward(module, ql, kl, vl, mask, scaling=head_dim**-0.5)[0]
    ours_grads = torch.autograd.grad(ours, (ql, kl, vl), grad_out.to(dtype))
    qp, kp, vp = low(q64), low(k64), low(v64)
    plain = dense_s2_in_dtype(qp, kp, vp, docs, group, heads)
    plain_grads = torch.autograd.grad(plain, (qp, kp, vp), grad_out.to(dtype))

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert ours.dtype == dtype
    assert err(ours, ref) <= MULTIPLE * err(plain, ref) + FLOOR[dtype], (err(ours, ref), err(plain, ref))
    for name, g_ours, g_plain, g_ref in zip("qkv", ours_grads, plain_grads, ref_grads, strict=True):
        assert err(g_ours, g_ref) <= MULTIPLE * err(g_plain, g_ref) + FLOOR[dtype], (name, err(g_ours, g_ref))


@pytest.mark.parametrize("shift", ["partition", "roll"])
# (9, 3) and (10, 5): the two head halves share one KV head, whose gradient sums both halves' contributions
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (9, 3), (10, 5), (5, 1), (3, 3)])
def test_gradients_match_reference_fp64(shift, heads, kv_heads):
    module = attention_module(heads, kv_heads, 8, s2_group_size=8, s2_shift=shift)
    q, k, v = random_qkv(2, heads, kv_heads, 48, 8, requires_grad=True, seed=3)
    mask, docs = (None, [[list(range(48))]] * 2) if shift == "roll" else padding_mask_4d([48, 31], 48, "left")
    grad_out = torch.randn(2, 48, heads, 8, dtype=torch.float64)
    ours = s2_attention_forward(module, q, k, v, mask)[0]
    want = reference_attention(q, k, v, docs, group_size=8, shift=shift)
    g_ours = torch.autograd.grad(ours, (q, k, v), grad_out)
    g_want = torch.autograd.grad(want, (q, k, v), grad_out)
    for a, b in zip(g_ours, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_padding_gets_no_gradient():
    module = attention_module(4, 2, 8, s2_group_size=4)
    q, k, v = random_qkv(2, 4, 2, 20, 8, requires_grad=True)
    mask, _ = padding_mask_4d([20, 12], 20, "left")
    out = s2_attention_forward(module, q, k, v, mask)[0]
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.count_nonzero(t.grad[1, :, :8]) == 0
