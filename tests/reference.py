"""An independent dense reference for S2-Attn, written from the issue's definitions.

Nothing here uses ``hf_longlora``: the masks are built position by position from the stated semantics, and
attention is plain masked softmax in whatever dtype the inputs have (fp64 for the reference).
"""

from __future__ import annotations

import math

import torch


def document_mask(length: int, group: int, *, shifted: bool, shift: str = "partition") -> torch.Tensor:
    """(L, L) bool for one document: may position i (row) attend position j (column)?"""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    if group >= length:
        return j <= i
    half = group // 2
    if not shifted or shift == "none":
        return (j <= i) & (i // group == j // group)
    if shift == "partition":
        # groups [0, h), [h, h + G), [h + G, h + 2G), ...
        def gid(p):
            return torch.where(
                p < half, torch.zeros_like(p), 1 + (p - half).div(group, rounding_mode="floor")
            )

        return (j <= i) & (gid(i) == gid(j))
    if shift == "roll":
        # roll by -h: position p lands at (p - h) mod L; group and causal order in the rolled sequence
        ri, rj = (i - half) % length, (j - half) % length
        return (rj <= ri) & (ri // group == rj // group)
    raise ValueError(shift)


def group_for(length: int, group_size: int | None, ratio: float) -> int:
    return group_size if group_size is not None else max(1, int(length * ratio))


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    documents: list[list[list[int]]],
    *,
    group_size: int | None = None,
    ratio: float = 0.25,
    shift: str = "partition",
    scale: float | None = None,
    full: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense S2-Attn.

    Args:
        query: (B, H, L, D); key/value: (B, Hkv, L, D).
        documents: per batch row, a list of documents, each the list of its real token positions in order.
            Positions in no document are padding: their outputs are 0.
        full: plain causal attention within documents (what eval mode must give).
        softcap: scores -> softcap * tanh(scores / softcap) before masking (Gemma 2).
        sinks: (H,) one extra logit per head in every row's softmax, attending nothing (gpt-oss).
        extra_mask: bool (B, 1 or H, L, L) ANDed with the S2 pattern (a sliding window, a custom mask).
        bias: float (B or 1, 1 or H, L, L) added to the scores (after softcap) before the S2 pattern masks them:
            an additive mask, as models' eager attention adds it (large negative values where masked).

    Returns:
        (B, L, H, D)
    """
    batch, heads, length, dim = query.shape
    rep = heads // key.shape[1]
    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1)
    first_shifted = heads - heads // 2
    mask = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for b, docs in enumerate(documents):
        for positions in docs:
            n = len(positions)
            group = group_for(n, group_size, ratio)
            idx = torch.tensor(positions)
            for h in range(heads):
                if full:
                    m = document_mask(n, n, shifted=False)
                else:
                    m = document_mask(n, group, shifted=h >= first_shifted, shift=shift)
                mask[b, h][idx[:, None], idx[None, :]] = m
    if extra_mask is not None:
        mask = mask & extra_mask
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    scores = (query @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    has_any = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~has_any, 0.0)
    if sinks is not None:
        # softmax over [scores, sink]: exp(s_j) / (sum_k exp(s_k) + exp(sink)), written out
        top = torch.maximum(scores.amax(-1, keepdim=True), sinks.view(1, -1, 1, 1))
        weights = torch.exp(scores - top) * mask
        probs = weights / (weights.sum(-1, keepdim=True) + torch.exp(sinks.view(1, -1, 1, 1) - top))
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = probs * has_any
    out = probs @ v  # (B, H, L, D)
    return out.transpose(1, 2)
