"""Attention with the logit features PyTorch SDPA lacks: tanh soft-capping (Gemma 2, VaultGemma) and attention
sinks (gpt-oss, GraniteMoE-SWA, ...), for S2-Attn's segments and its dense fallback.

The scores are materialised, one run of equal-length segments at a time (``(segments, heads, n, n)`` for
segments of n tokens), so S2-Attn's memory grows with L x G, not L^2. Both features act on the logits before the
softmax, exactly as the models' own ``eager_attention_forward`` does::

    s = (q @ k^T) * scale                  # (.., Lq, Lk)
    s = softcap * tanh(s / softcap)         # soft-capping, if any
    s = s masked to the allowed keys
    p = softmax([s, sink_h])[..., :-1]      # a sink: one extra logit per head in every row, then dropped
    out = dropout(p) @ v

The softmax runs in fp32 for bf16/fp16 inputs (the models' eager code runs it in the score dtype): in bf16 this is at least as close to
an fp64 reference as the model's own eager attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half precisions, the input's own dtype otherwise (fp64 stays fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    *,
    scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention over batched heads with a mask.

    Args:
        query: ``(N, Hq, Lq, D)``; key: ``(N, Hkv, Lk, D)``; value: ``(N, Hkv, Lk, Dv)``; ``Hq % Hkv == 0``.
        keep: bool, broadcastable to ``(N, Hq, Lq, Lk)``, True = attend; an additive float mask; or None (all).
            Every row must keep at least one key unless ``sinks`` is given.
        scale: softmax scale.
        softcap: tanh soft-capping of the scores (``None``: none).
        sinks: ``(Hq,)`` one sink logit per query head (``None``: none).
        dropout_p: dropout on the attention probabilities.

    Returns:
        ``(N, Hq, Lq, Dv)``.
    """
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)  # (N, Hq, Lk, D)
        value = value.repeat_interleave(rep, dim=1)  # (N, Hq, Lk, Dv)
    scores = torch.matmul(query, key.transpose(-1, -2))  # (N, Hq, Lq, Lk)
    scores = scores.to(_softmax_dtype(scores.dtype)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if keep is not None:
        if keep.dtype == torch.bool:
            scores = scores.masked_fill(~keep, float("-inf"))
        else:
            scores = scores + keep.to(scores.dtype)
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        scores = torch.cat([scores, sink], dim=-1)  # (N, Hq, Lq, Lk + 1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]  # the sink takes its share of the mass and attends nothing
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs.to(value.dtype), value)  # (N, Hq, Lq, Dv)
