"""The flash-attn varlen path: its glue runs on CPU against an emulation of flash_attn_varlen_func's contract;
the real kernel is tested on a CUDA machine with flash-attn installed (skipped here)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import attention_module, padding_mask_4d, random_qkv
from reference import reference_attention

import hf_longlora.attention.backend as backend
import hf_longlora.attention.flash as flash
from hf_longlora import s2_attention_forward


def emulated_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
):
    """flash_attn_varlen_func's documented contract, in plain PyTorch.

    q (total_q, H, D), k/v (total_k, Hkv, D) with H % Hkv == 0; cu_seqlens int32 of shape (batch + 1,);
    max_seqlen the longest segment; causal masks are aligned to the bottom right of each segment.
    """
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert cu_seqlens_q.device == q.device
    assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    assert max_seqlen_q == max(lengths_q) and max_seqlen_k == max(lengths_k)
    assert q.shape[1] % k.shape[1] == 0
    assert dropout_p == 0.0
    rep = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for i, (lq, lk) in enumerate(zip(lengths_q, lengths_k, strict=True)):
        sq, sk = int(cu_seqlens_q[i]), int(cu_seqlens_k[i])
        qi = q[sq : sq + lq].transpose(0, 1)  # (H, lq, D)
        ki = k[sk : sk + lk].transpose(0, 1).repeat_interleave(rep, 0)
        vi = v[sk : sk + lk].transpose(0, 1).repeat_interleave(rep, 0)
        scores = qi @ ki.transpose(-1, -2) * scale
        if causal:
            keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~keep, float("-inf"))
        out[sq : sq + lq] = (torch.softmax(scores, -1) @ vi).transpose(0, 1)
    return out


@pytest.fixture
def emulated_flash(monkeypatch):
    calls = []

    def kernel(*args, **kwargs):
        calls.append(kwargs["cu_seqlens_q"].tolist())
        return emulated_flash_attn_varlen_func(*args, **kwargs)

    monkeypatch.setattr(backend, "use_flash_attn", lambda query: True)
    monkeypatch.setattr(flash, "load_flash_attn_varlen_func", lambda: kernel)
    return calls


@pytest.mark.parametrize("shift", ["partition", "roll"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (8, 8)])
def test_flash_glue_matches_reference(emulated_flash, shift, heads, kv_heads):
    module = attention_module(heads, kv_heads, 8, s2_group_size=8, s2_shift=shift)
    q, k, v = random_qkv(2, heads, kv_heads, 48, 8)
    mask, docs = (
        (None, [[list(range(48))]] * 2) if shift == "roll" else padding_mask_4d([48, 29], 48, "right")
    )
    got = s2_attention_forward(module, q, k, v, mask)[0]
    want = reference_attention(q, k, v, docs, group_size=8, shift=shift)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert emulated_flash, "the flash path was not taken"
    if shift == "partition":
        # the shifted half's boundaries: [h, G, ..., rest] per document, documents one after another
        assert [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 77] in emulated_flash
        assert [0, 4, 12, 20, 28, 36, 44, 48, 52, 60, 68, 76, 77] in emulated_flash


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and flash.is_flash_attn_available()), reason="needs CUDA and flash-attn"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_kernel_matches_sdpa_on_gpu(dtype):
    module = attention_module(8, 2, 64, s2_group_size=256).cuda()
    q, k, v = (t.to("cuda", dtype) for t in random_qkv(2, 8, 2, 1024, 64, dtype=torch.float32))
    assert flash.use_flash_attn(q)
    got = s2_attention_forward(module, q, k, v, None)[0]
    want = reference_attention(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), [[list(range(1024))]] * 2, group_size=256
    )
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-2, rtol=0)


def test_flash_not_used_on_cpu():
    q = torch.zeros(3, 2, 8, dtype=torch.bfloat16)
    assert not flash.use_flash_attn(q)
