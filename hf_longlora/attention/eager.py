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

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .groups import equal_length_runs


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


def eager_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: Sequence[int],
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`hf_longlora.attention.sdpa.sdpa_varlen_attention`'s contract (causal within each segment of packed
    ``(T, H, D)`` tensors) with ``softcap`` and ``sinks`` (``(Hq,)``), on :func:`eager_attention`."""
    total, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at {total} tokens, got {cu_seqlens[0]}..{cu_seqlens[-1]}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    scale = head_dim**-0.5 if scale is None else scale
    runs = equal_length_runs(cu_seqlens)
    spans = [length * count for _, length, count in runs]
    queries, keys, values = (t.split(spans, dim=0) for t in (query, key, value))
    outputs = []
    for (_, length, count), q, k, v in zip(runs, queries, keys, values, strict=True):
        q = q.view(count, length, num_heads, head_dim).transpose(1, 2)  # (n, Hq, len, D)
        k = k.view(count, length, num_kv_heads, head_dim).transpose(1, 2)  # (n, Hkv, len, D)
        v = v.view(count, length, num_kv_heads, -1).transpose(1, 2)  # (n, Hkv, len, Dv)
        causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()  # (len, len)
        out = eager_attention(q, k, v, causal, scale=scale, softcap=softcap, sinks=sinks, dropout_p=dropout_p)
        outputs.append(out.transpose(1, 2).reshape(length * count, num_heads, -1))  # (n * len, Hq, Dv)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
