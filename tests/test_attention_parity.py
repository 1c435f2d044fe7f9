"""S2-Attn against the independent dense fp64 reference (tests/reference.py) on many inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import attention_module, padding_mask_4d, random_qkv, sliding_window_mask
from hypothesis import example, given, settings
from hypothesis import strategies as st
from reference import reference_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from hf_longlora import s2_attention_forward

FP64_TOL = 1e-10


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records the arguments of every scaled_dot_product_attention call (the real kernel still runs)."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append({"q": q, "k": k, **kwargs})
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


HEAD_LAYOUTS = [(1, 1), (2, 1), (3, 1), (4, 2), (4, 4), (5, 5), (6, 2), (8, 2), (9, 3), (7, 7)]


def run_s2(module, q, k, v, mask=None, **kwargs):
    out, weights = s2_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5, **kwargs)
    assert weights is None
    return out


def real_positions(docs, batch_row):
    return [p for doc in docs[batch_row] for p in doc]


@st.composite
def s2_cases(draw):
    heads, kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    shift = draw(st.sampled_from(["partition", "partition", "roll", "none"]))
    batch = draw(st.integers(1, 3))
    if shift == "none":
        group = draw(st.integers(2, 17))
        lengths = [draw(st.integers(1, 60)) for _ in range(batch)]
        knobs = {"s2_group_size": group, "s2_shift": "none"}
    elif shift == "roll":
        group = draw(st.integers(2, 9))
        lengths = [group * draw(st.integers(1, 5)) for _ in range(batch)]
        knobs = {"s2_group_size": group, "s2_shift": "roll"}
    elif draw(st.booleans()):
        group = draw(st.integers(2, 17))
        lengths = [draw(st.integers(1, 60)) for _ in range(batch)]
        knobs = {"s2_group_size": group}
    else:
        ratio = draw(st.sampled_from([0.1, 0.25, 0.3, 0.5, 1.0]))
        lengths = [draw(st.integers(1, 60)) for _ in range(batch)]
        knobs = {"s2_group_size_ratio": ratio}
    side = draw(st.sampled_from(["left", "right"]))
    total = max(lengths) + draw(st.integers(0, 4))
    return heads, kv_heads, head_dim, knobs, lengths, total, side


@settings(max_examples=80, deadline=None)
@given(case=s2_cases(), seed=st.integers(0, 2**16))
def test_matches_dense_reference_fp64(case, seed):
    heads, kv_heads, head_dim, knobs, lengths, total, side = case
    module = attention_module(heads, kv_heads, head_dim, **knobs)
    q, k, v = random_qkv(len(lengths), heads, kv_heads, total, head_dim, seed=seed)
    if all(n == total for n in lengths):
        mask, docs = None, [[list(range(total))] for _ in lengths]
    else:
        mask, docs = padding_mask_4d(lengths, total, side)
    got = run_s2(module, q, k, v, mask)
    want = reference_attention(
        q,
        k,
        v,
        docs,
        group_size=knobs.get("s2_group_size"),
        ratio=knobs.get("s2_group_size_ratio", 0.25),
        shift=knobs.get("s2_shift", "partition"),
    )
    assert got.shape == (len(lengths), total, heads, head_dim)
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=0)


@pytest.mark.parametrize("length", [1, 2, 7, 16, 33, 64, 100])
@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.5])
def test_ratio_group_any_length(length, ratio):
    module = attention_module(4, 2, 8, s2_group_size_ratio=ratio)
    q, k, v = random_qkv(1, 4, 2, length, 8, seed=length)
    want = reference_attention(q, k, v, [[list(range(length))]], ratio=ratio)
    torch.testing.assert_close(run_s2(module, q, k, v), want, atol=FP64_TOL, rtol=0)


def test_group_at_least_length_is_plain_causal():
    module = attention_module(4, 2, 8, s2_group_size=64)
    q, k, v = random_qkv(2, 4, 2, 40, 8)
    want = reference_attention(q, k, v, [[list(range(40))]] * 2, full=True)
    torch.testing.assert_close(run_s2(module, q, k, v), want, atol=FP64_TOL, rtol=0)


def test_roll_requires_multiple_of_group():
    module = attention_module(4, 2, 8, s2_group_size=8, s2_shift="roll")
    q, k, v = random_qkv(1, 4, 2, 30, 8)
    with pytest.raises(
        ValueError, match=r"s2_shift='roll'.*multiple of the group size.*30 tokens.*group size 8"
    ):
        run_s2(module, q, k, v)


# ---------------------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("length,group", [(32, 8), (37, 8), (50, 12), (23, 5)])
def test_partition_is_causal(length, group):
    """Changing token j's q, k and v never changes an output before j."""
    module = attention_module(4, 2, 8, s2_group_size=group)
    q, k, v = random_qkv(1, 4, 2, length, 8)
    base = run_s2(module, q, k, v)
    for j in range(length):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[:, :, j] += 3.0
        changed = run_s2(module, q2, k2, v2)
        torch.testing.assert_close(changed[:, :j], base[:, :j], atol=0, rtol=0)
        assert not torch.allclose(changed[:, j], base[:, j])


def test_no_shift_keeps_every_head_inside_its_group():
    """s2_shift='none' (the paper's short-attention ablation): no head sees across a group border."""
    module = attention_module(4, 2, 8, s2_group_size=4, s2_shift="none")
    q, k, v = random_qkv(1, 4, 2, 12, 8)
    v2 = v.clone()
    v2[:, :, 3] += 1.0  # the last token of group 0
    delta = (run_s2(module, q, k, v2) - run_s2(module, q, k, v)).abs().amax(dim=(0, 2, 3))  # (L,)
    assert delta[3] > 0 and delta[4:].max() == 0  # with a shift, half the heads of tokens 4-5 would see it


def test_roll_sees_the_future_as_in_the_paper():
    """The paper's roll lets the first h tokens of the shifted heads see the last h tokens."""
    module = attention_module(2, 2, 8, s2_group_size=8, s2_shift="roll")
    q, k, v = random_qkv(1, 2, 2, 32, 8)
    base = run_s2(module, q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 3.0
    v2[:, :, -1] += 3.0
    changed = run_s2(module, q, k2, v2)
    # head 0 (unshifted) is causal, head 1 (shifted) at position 0 sees position 31
    torch.testing.assert_close(changed[:, :31, 0], base[:, :31, 0], atol=0, rtol=0)
    assert not torch.allclose(changed[:, 0, 1], base[:, 0, 1])


# ---------------------------------------------------------------------------------------------------------
# eval / decoding == sdpa


def _sdpa(module, q, k, v, mask):
    return sdpa_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_mode_is_exactly_sdpa(dtype):
    module = attention_module(9, 3, 16, training=False, s2_group_size=8)
    q, k, v = random_qkv(2, 9, 3, 40, 16, dtype=dtype)
    assert torch.equal(run_s2(module, q, k, v), _sdpa(module, q, k, v, None))
    mask, _ = padding_mask_4d([40, 25], 40, "left")
    assert torch.equal(run_s2(module, q, k, v, mask), _sdpa(module, q, k, v, mask))


def test_decoding_with_cache_is_exactly_sdpa():
    """Keys longer than queries (a KV cache) get full attention even in training mode."""
    module = attention_module(4, 2, 8, training=True, s2_group_size=4)
    q, _, _ = random_qkv(1, 4, 2, 1, 8, seed=1)
    _, k, v = random_qkv(1, 4, 2, 33, 8, seed=2)
    assert torch.equal(run_s2(module, q, k, v), _sdpa(module, q, k, v, None))
    q5, _, _ = random_qkv(1, 4, 2, 5, 8, seed=3)
    mask = sdpa_mask(
        batch_size=1, q_length=5, kv_length=33, q_offset=28, allow_is_causal_skip=False, device="cpu"
    )
    assert torch.equal(run_s2(module, q5, k, v, mask), _sdpa(module, q5, k, v, mask))


# ---------------------------------------------------------------------------------------------------------
# padding and packing


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(side):
    """With a fixed group size, a row's outputs depend neither on other rows nor on its padding."""
    module = attention_module(4, 2, 8, s2_group_size=6)
    q, k, v = random_qkv(1, 4, 2, 29, 8, seed=5)
    alone = run_s2(module, q, k, v)[0]
    for total, other_len in [(29, 10), (35, 35), (40, 3)]:
        pad = total - 29
        other_q, other_k, other_v = random_qkv(1, 4, 2, total, 8, seed=total)

        def place(t, other, total=total, pad=pad):
            row = torch.zeros(1, t.shape[1], total, t.shape[-1], dtype=t.dtype)
            if side == "left":
                row[:, :, pad:] = t
            else:
                row[:, :, :29] = t
            return torch.cat([row, other], dim=0)

        mask, _ = padding_mask_4d([29, other_len], total, side)
        out = run_s2(module, place(q, other_q), place(k, other_k), place(v, other_v), mask)
        real = slice(pad, total) if side == "left" else slice(0, 29)
        torch.testing.assert_close(out[0, real], alone, atol=1e-12, rtol=0)
        padded = slice(0, pad) if side == "left" else slice(29, total)
        assert torch.count_nonzero(out[0, padded]) == 0


def _packed_inputs(doc_lengths, heads=4, kv_heads=2, dim=8, seed=0):
    docs = [random_qkv(1, heads, kv_heads, n, dim, seed=seed + i) for i, n in enumerate(doc_lengths)]
    q = torch.cat([d[0] for d in docs], dim=2)
    k = torch.cat([d[1] for d in docs], dim=2)
    v = torch.cat([d[2] for d in docs], dim=2)
    return docs, q, k, v


@pytest.mark.parametrize("knobs", [{"s2_group_size": 6}, {"s2_group_size_ratio": 0.25}])
def test_packed_equals_unpacked_with_cu_seq_lens(knobs):
    doc_lengths = [17, 3, 40, 1, 24]
    module = attention_module(4, 2, 8, **knobs)
    docs, q, k, v = _packed_inputs(doc_lengths)
    cu = torch.tensor([0, *torch.tensor(doc_lengths).cumsum(0).tolist()], dtype=torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths])[None]
    packed = run_s2(
        module,
        q,
        k,
        v,
        None,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(doc_lengths),
        max_length_k=max(doc_lengths),
        position_ids=position_ids,
    )
    one_by_one = torch.cat([run_s2(module, *d) for d in docs], dim=1)
    torch.testing.assert_close(packed, one_by_one, atol=1e-12, rtol=0)


def test_packed_equals_unpacked_with_position_ids_and_mask():
    """Packing detected from position_ids, as transformers builds the mask without cu_seq_lens."""
    from transformers.masking_utils import find_packed_sequence_indices, packed_sequence_mask_function

    doc_lengths = [13, 30, 9]
    module = attention_module(4, 2, 8, s2_group_size=8)
    docs, q, k, v = _packed_inputs(doc_lengths, seed=7)
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths])[None]
    packed_ids = find_packed_sequence_indices(position_ids)
    from transformers.masking_utils import and_masks, causal_mask_function

    mask = sdpa_mask(
        batch_size=1,
        q_length=52,
        kv_length=52,
        mask_function=and_masks(causal_mask_function, packed_sequence_mask_function(packed_ids)),
        allow_is_causal_skip=False,
        device="cpu",
    )
    packed = run_s2(module, q, k, v, mask, position_ids=position_ids)
    one_by_one = torch.cat([run_s2(module, *d) for d in docs], dim=1)
    torch.testing.assert_close(packed, one_by_one, atol=1e-12, rtol=0)


def test_sliding_window_mask_falls_back_to_dense():
    """A mask that is more than padding (here a sliding window narrower than the group) is honoured."""
    module = attention_module(4, 2, 8, s2_group_size=16)
    q, k, v = random_qkv(1, 4, 2, 40, 8)
    mask = sliding_window_mask(40, 5)
    got = run_s2(module, q, k, v, mask)
    # reference: S2 pattern AND the window, dense
    from reference import document_mask

    window = mask[0, 0]
    s2 = [document_mask(40, 16, shifted=h >= 2) for h in range(4)]
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2)) * 8**-0.5
    full_mask = torch.stack([window & m for m in s2])[None]
    want = (torch.softmax(scores.masked_fill(~full_mask, float("-inf")), -1) @ vv).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# GQA without repeated K/V


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (8, 2), (6, 3), (5, 1), (12, 4)])
def test_gqa_odd_head_counts(heads, kv_heads):
    module = attention_module(heads, kv_heads, 8, s2_group_size=7)
    q, k, v = random_qkv(2, heads, kv_heads, 45, 8, seed=heads)
    want = reference_attention(q, k, v, [[list(range(45))]] * 2, group_size=7)
    torch.testing.assert_close(run_s2(module, q, k, v), want, atol=FP64_TOL, rtol=0)


def test_gqa_does_not_repeat_kv(sdpa_calls):
    """Every SDPA call gets whole KV heads (K/V sliced, never repeated) and enable_gqa when heads differ."""
    module = attention_module(9, 3, 8, s2_group_size=8)
    q, k, v = random_qkv(1, 9, 3, 64, 8)
    run_s2(module, q, k, v)
    assert sdpa_calls
    k_start, k_end = k.data_ptr(), k.data_ptr() + k.numel() * k.element_size()
    for call in sdpa_calls:
        q_heads, kv_heads = call["q"].shape[1], call["k"].shape[1]
        assert kv_heads <= 3 and q_heads % kv_heads == 0
        assert call.get("enable_gqa", False) == (q_heads != kv_heads)
        assert k_start <= call["k"].data_ptr() < k_end  # a view of the caller's K, not a copy


# ---------------------------------------------------------------------------------------------------------
# more packing, masks and modes


@st.composite
def packed_cases(draw):
    heads, kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    shift = draw(st.sampled_from(["partition", "roll", "none"]))
    if shift == "roll":
        group = draw(st.integers(2, 8))
        lengths = [group * draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 5)))]
        knobs = {"s2_group_size": group, "s2_shift": "roll"}
    else:
        lengths = [draw(st.integers(1, 40)) for _ in range(draw(st.integers(1, 5)))]
        knobs = draw(
            st.sampled_from([{"s2_group_size": 5}, {"s2_group_size_ratio": 0.25}, {"s2_group_size": 16}])
        )
        if shift == "none":
            knobs = {**knobs, "s2_shift": "none"}
    return heads, kv_heads, knobs, lengths


@settings(max_examples=40, deadline=None)
@given(case=packed_cases(), seed=st.integers(0, 2**16))
def test_packed_documents_match_reference(case, seed):
    heads, kv_heads, knobs, lengths = case
    module = attention_module(heads, kv_heads, 8, **knobs)
    total = sum(lengths)
    q, k, v = random_qkv(1, heads, kv_heads, total, 8, seed=seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    starts = cu[:-1].tolist()
    docs = [[list(range(s, s + n)) for s, n in zip(starts, lengths, strict=True)]]
    got = run_s2(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    want = reference_attention(
        q,
        k,
        v,
        docs,
        group_size=knobs.get("s2_group_size"),
        ratio=knobs.get("s2_group_size_ratio", 0.25),
        shift=knobs.get("s2_shift", "partition"),
    )
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=0)


def test_cu_seq_lens_over_several_batch_rows():
    """cu_seq_lens may describe a (B, L) batch flattened row by row; documents may not cross rows."""
    module = attention_module(4, 2, 8, s2_group_size=4)
    q, k, v = random_qkv(2, 4, 2, 20, 8)
    cu = torch.tensor([0, 7, 20, 31, 40], dtype=torch.int32)
    docs = [[list(range(0, 7)), list(range(7, 20))], [list(range(0, 11)), list(range(11, 20))]]
    got = run_s2(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(got, reference_attention(q, k, v, docs, group_size=4), atol=FP64_TOL, rtol=0)
    crossing = torch.tensor([0, 25, 40], dtype=torch.int32)
    with pytest.raises(ValueError, match="crossing a batch row boundary"):
        run_s2(module, q, k, v, None, cu_seq_lens_q=crossing)


def test_mask_broadcast_over_the_batch():
    module = attention_module(4, 2, 8, s2_group_size=6)
    q, k, v = random_qkv(3, 4, 2, 30, 8)
    causal = torch.tril(torch.ones(30, 30, dtype=torch.bool))[None, None]  # (1, 1, L, L)
    want = reference_attention(q, k, v, [[list(range(30))]] * 3, group_size=6)
    torch.testing.assert_close(run_s2(module, q, k, v, causal), want, atol=FP64_TOL, rtol=0)


def test_sliding_window_wider_than_groups_keeps_the_fast_path(sdpa_calls):
    """S2 AND a window wider than every segment is S2: no dense mask is built."""
    module = attention_module(4, 2, 8, s2_group_size=8)
    q, k, v = random_qkv(1, 4, 2, 40, 8)
    mask = sliding_window_mask(40, 12)
    got = run_s2(module, q, k, v, mask, sliding_window=12)
    torch.testing.assert_close(
        got, reference_attention(q, k, v, [[list(range(40))]], group_size=8), atol=FP64_TOL, rtol=0
    )
    assert sdpa_calls and all(call.get("attn_mask") is None for call in sdpa_calls)


def test_dense_fallback_with_padding():
    """A sliding window narrower than the groups, on a left-padded batch: window AND S2, per row."""
    from reference import document_mask
    from transformers.masking_utils import sliding_window_causal_mask_function

    module = attention_module(4, 2, 8, s2_group_size=16)
    q, k, v = random_qkv(2, 4, 2, 36, 8)
    pad = torch.ones(2, 36, dtype=torch.bool)
    pad[1, :10] = False
    mask = sdpa_mask(
        batch_size=2,
        q_length=36,
        kv_length=36,
        mask_function=sliding_window_causal_mask_function(5),
        attention_mask=pad,
        allow_is_causal_skip=False,
        device="cpu",
    )
    got = run_s2(module, q, k, v, mask, sliding_window=5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for b, start in ((0, 0), (1, 10)):
        n = 36 - start
        window = mask[b, 0, start:, start:]
        full_mask = torch.stack([window & document_mask(n, 16, shifted=h >= 2) for h in range(4)])
        scores = (q[b, :, start:] @ kk[b, :, start:].transpose(-1, -2)) * 8**-0.5
        want = (
            torch.softmax(scores.masked_fill(~full_mask, float("-inf")), -1) @ vv[b, :, start:]
        ).transpose(0, 1)
        torch.testing.assert_close(got[b, start:], want, atol=FP64_TOL, rtol=0)
    assert torch.count_nonzero(got[1, :10]) == 0


def test_training_forward_under_inference_mode():
    module = attention_module(4, 2, 8, s2_group_size=4)
    q, k, v = random_qkv(2, 4, 2, 12, 8)
    mask, docs = padding_mask_4d([12, 7], 12, "right")
    with torch.inference_mode():
        got = run_s2(module, q, k, v, mask)
    torch.testing.assert_close(got, reference_attention(q, k, v, docs, group_size=4), atol=FP64_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# generated masks: sliding windows, per-head and additive masks, packing with padding, dropout
#
# Every case is one batch the backend must reduce correctly: rows of one or more documents (restarting
# position_ids, as a packed collator makes them) with left or right padding, and on top of that one of
#   "plain"    the mask transformers builds: causal AND same document AND real keys (the fast path);
#   "window"   that AND a sliding window of w tokens, w drawn around the group size so both the windows
#              wider than every segment (fast path) and narrower ones (dense fallback) come up;
#   "per_head" a bool (B, H, L, L) mask: that AND a random per-head pattern (dense fallback);
#   "float"    an additive (B or 1, 1 or H, L, L) float mask: a random bias, finfo.min where masked (dense
#              fallback; a float mask says nothing about padding, so these rows have none);
#   "cu"       several rows packed padding-free and described by cu_seq_lens_q (no mask).
# The reference is the dense fp64 S2 pattern of each document (tests/reference.py), ANDed with the window or
# the per-head pattern, with the bias added to the scores.

MASK_KINDS = ["plain", "window", "per_head", "float", "cu"]


def window_band(length: int, window: int) -> torch.Tensor:
    """(L, L) bool: i sees j iff i - window < j <= i (transformers' sliding window), written out here."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= i) & (j > i - window)


@st.composite
def masked_cases(draw):
    heads, kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    kind = draw(st.sampled_from(MASK_KINDS))
    shift = draw(st.sampled_from(["partition", "partition", "roll", "none"]))
    batch = draw(st.integers(1, 3))
    if shift == "roll":
        group = draw(st.integers(2, 8))
        knobs = {"s2_group_size": group, "s2_shift": "roll"}

        def doc_length():
            return group * draw(st.integers(1, 3))
    else:
        knobs = draw(
            st.sampled_from([{"s2_group_size": 4}, {"s2_group_size": 7}, {"s2_group_size_ratio": 0.25}])
        )
        group = knobs.get("s2_group_size", 8)
        if shift == "none":
            knobs = {**knobs, "s2_shift": "none"}

        def doc_length():
            return draw(st.integers(1, 30))

    rows = [[doc_length() for _ in range(draw(st.integers(1, 3)))] for _ in range(batch)]
    real = [sum(r) for r in rows]
    if kind == "cu":  # padding-free: a last document fills each row (a multiple of the group with "roll")
        total = max(real)
        rows = [r + [total - n] if n < total else r for r, n in zip(rows, real, strict=True)]
        pads = [0] * len(rows)
    elif kind == "float":  # no padding
        total = max(real)
        rows = [r for r, n in zip(rows, real, strict=True) if n == total]
        pads = [0] * len(rows)
    else:
        total = max(real) + draw(st.integers(0, 5))
        pads = [total - sum(r) for r in rows]
    side = draw(st.sampled_from(["left", "right"]))
    # around the group size half the time: the window one token narrower than the longest segment must go dense
    around = st.sampled_from([group - 1, group, group + 1]).filter(lambda w: w >= 1)
    window = draw(st.one_of(around, st.integers(1, 2 * group + 2))) if kind == "window" else None
    pass_window = draw(st.booleans())
    mask_batch = 1 if kind == "float" and draw(st.booleans()) else len(rows)
    mask_heads = heads if kind == "per_head" or (kind == "float" and draw(st.booleans())) else 1
    return dict(
        heads=heads, kv_heads=kv_heads, kind=kind, knobs=knobs, rows=rows, pads=pads, total=total, side=side,
        window=window, pass_window=pass_window, mask_batch=mask_batch, mask_heads=mask_heads,
    )  # fmt: skip


def _case(kind, knobs, rows, pads, heads=(4, 2), side="left", window=None, mask_batch=None, mask_heads=1):
    assert len({sum(r) + pad for r, pad in zip(rows, pads, strict=True)}) == 1, "rows of different lengths"
    return dict(
        heads=heads[0], kv_heads=heads[1], kind=kind, knobs=knobs, rows=rows, pads=pads,
        total=sum(rows[0]) + pads[0], side=side, window=window, pass_window=window is not None,
        mask_batch=mask_batch or len(rows), mask_heads=mask_heads,
    )  # fmt: skip


# always run, whatever hypothesis draws: the borders a plausible bug sits on
MASKED_EXAMPLES = [
    # "roll" with a window wider than the groups but narrower than the document: the window cuts the wrap-around;
    # an odd group, where rolling by -h and by +h give different orders (the dense path must invert the roll)
    _case("window", {"s2_group_size": 5, "s2_shift": "roll"}, [[15, 5], [10]], [0, 10], window=7),
    _case(
        "per_head",
        {"s2_group_size": 3, "s2_shift": "roll"},
        [[12], [6, 3]],
        [0, 3],
        heads=(4, 2),
        mask_heads=4,
    ),
    # a window one token narrower than the groups (dense) and exactly as wide (fast path), packed and padded
    _case("window", {"s2_group_size": 7}, [[20, 9], [11]], [1, 19], side="right", window=6),
    _case("window", {"s2_group_size": 7}, [[20, 9], [11]], [1, 19], side="right", window=7),
    _case("per_head", {"s2_group_size": 4}, [[13, 6], [17]], [2, 4], heads=(9, 3), mask_heads=9),
    _case(
        "float",
        {"s2_group_size_ratio": 0.25},
        [[16, 9], [25]],
        [0, 0],
        heads=(6, 2),
        mask_batch=1,
        mask_heads=6,
    ),
    _case("plain", {"s2_group_size": 4, "s2_shift": "roll"}, [[8, 4], [4, 4, 4]], [5, 5]),
    _case("cu", {"s2_group_size": 7}, [[20, 9], [3, 26]], [0, 0], heads=(5, 5)),
]


def with_masked_examples(**extra):
    def decorate(test):
        for case in MASKED_EXAMPLES:
            test = example(case=case, seed=3, **extra)(test)
        return test

    return decorate


def build_masked_case(case, seed):
    """The backend's inputs for a case (mask and kwargs) and the reference's (documents, extra_mask, bias)."""
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
        sliding_window_causal_mask_function,
    )

    rows, pads, total, side, kind = case["rows"], case["pads"], case["total"], case["side"], case["kind"]
    batch, heads = len(rows), case["heads"]
    g = torch.Generator().manual_seed(seed + 1)
    position_ids = torch.zeros(batch, total, dtype=torch.long)
    valid = torch.zeros(batch, total, dtype=torch.bool)
    docs = []
    for b, (lengths, pad) in enumerate(zip(rows, pads, strict=True)):
        start = pad if side == "left" else 0
        row_docs = []
        for n in lengths:
            position_ids[b, start : start + n] = torch.arange(n)
            row_docs.append(list(range(start, start + n)))
            start += n
        valid[b] = torch.zeros(total, dtype=torch.bool).index_fill(0, torch.tensor(sum(row_docs, [])), True)
        docs.append(row_docs)
    kwargs = {"position_ids": position_ids}
    extra_mask = bias = None
    if kind == "cu":
        lengths = [n for r in rows for n in r]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return None, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}, docs, None, None
    function = causal_mask_function
    if kind == "window":
        function = sliding_window_causal_mask_function(case["window"])
        extra_mask = window_band(total, case["window"])[None, None]
        if case["pass_window"]:
            kwargs["sliding_window"] = case["window"]
    packed_ids = (position_ids != torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], 1) + 1).cumsum(1)
    mask = sdpa_mask(
        batch_size=batch,
        q_length=total,
        kv_length=total,
        mask_function=and_masks(function, packed_sequence_mask_function(packed_ids)),
        attention_mask=valid,
        allow_is_causal_skip=False,
        device="cpu",
    )  # (B, 1, L, L): causal AND same document AND real keys (AND the window)
    if kind == "per_head":
        # causal (also for "roll": a mask that says causal cuts the roll's wrap-around) and each sees itself
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        extra_mask = (
            (torch.rand(batch, heads, total, total, generator=g) < 0.6) | torch.eye(total).bool()
        ) & causal
        mask = mask & extra_mask
    elif kind == "float":
        shape = (case["mask_batch"], case["mask_heads"], total, total)
        blocked = (torch.rand(shape, generator=g) < 0.3) & ~torch.eye(total, dtype=torch.bool)
        bias = torch.randn(shape, generator=g, dtype=torch.float64)
        bias = bias.masked_fill(blocked | ~torch.ones(total, total, dtype=torch.bool).tril(), -torch.inf)
        mask = bias.clamp_min(torch.finfo(torch.float64).min)  # transformers' additive masks: finfo.min
        bias = mask
    if extra_mask is not None and case["knobs"].get("s2_shift") == "roll" and cuts_nothing(extra_mask, docs):
        # a bool mask that cuts nothing inside any document is plain padding/packing, and with "roll" plain
        # masks keep the paper's wrap-around (the first h tokens see the last h); only a mask that really
        # restricts attention is ANDed in, and its causality then cuts the wrap-around too
        extra_mask = None
    return mask, kwargs, docs, extra_mask, bias


def cuts_nothing(extra_mask: torch.Tensor, docs) -> bool:
    """Does the (B or 1, 1 or H, L, L) bool mask allow every causal pair inside each document?"""
    for b, row_docs in enumerate(docs):
        for positions in row_docs:
            idx = torch.tensor(positions)
            inside = extra_mask[min(b, extra_mask.shape[0] - 1)][:, idx[:, None], idx[None, :]]
            if not inside[:, torch.ones(len(idx), len(idx), dtype=torch.bool).tril()].all():
                return False
    return True


def reference_for(case, q, k, v, docs, extra_mask, bias):
    return reference_attention(
        q,
        k,
        v,
        docs,
        group_size=case["knobs"].get("s2_group_size"),
        ratio=case["knobs"].get("s2_group_size_ratio", 0.25),
        shift=case["knobs"].get("s2_shift", "partition"),
        extra_mask=extra_mask,
        bias=bias,
    )


@settings(max_examples=50, deadline=None)
@with_masked_examples()
@given(case=masked_cases(), seed=st.integers(0, 2**16))
def test_generated_masks_match_dense_reference(case, seed):
    module = attention_module(case["heads"], case["kv_heads"], 8, **case["knobs"])
    q, k, v = random_qkv(len(case["rows"]), case["heads"], case["kv_heads"], case["total"], 8, seed=seed)
    mask, kwargs, docs, extra_mask, bias = build_masked_case(case, seed)
    got = run_s2(module, q, k, v, mask, **kwargs)
    want = reference_for(case, q, k, v, docs, extra_mask, bias)
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=0)


@settings(max_examples=30, deadline=None)
@with_masked_examples(p=0.5)
@given(case=masked_cases(), seed=st.integers(0, 2**16), p=st.sampled_from([0.3, 0.5]))
def test_generated_masks_with_dropout_match_the_reference_weights(case, seed, p):
    """Exact dropout check: with one-hot values (V = identity) the output of query i is its row of attention
    weights after dropout, so each entry must be either 0 (dropped) or the reference's weight / (1 - p), nothing
    outside the reference's pattern may appear, and about a fraction p is dropped."""
    batch, heads, kv_heads, total = len(case["rows"]), case["heads"], case["kv_heads"], case["total"]
    module = attention_module(heads, kv_heads, 8, **case["knobs"])
    q, k, _ = random_qkv(batch, heads, kv_heads, total, 8, seed=seed)
    v = torch.eye(total, dtype=torch.float64).expand(batch, kv_heads, total, total)
    mask, kwargs, docs, extra_mask, bias = build_masked_case(case, seed)
    weights = reference_for(case, q, k, v, docs, extra_mask, bias)  # (B, L, H, L): row i = weights of i
    torch.manual_seed(seed)
    got = run_s2(module, q, k, v, mask, dropout=p, **kwargs)
    kept = got != 0
    assert not kept[weights == 0].any()
    torch.testing.assert_close(got[kept], weights[kept] / (1 - p), atol=FP64_TOL, rtol=0)
    n = int((weights > 0).sum())
    dropped = n - int(kept.sum())
    assert abs(dropped - p * n) <= 5 * (n * p * (1 - p)) ** 0.5 + 1, (dropped, n)
