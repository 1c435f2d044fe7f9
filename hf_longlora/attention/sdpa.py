"""Variable-length causal attention on PyTorch SDPA: flash-attn's varlen contract, any device.

The packed tokens are cut into segments by ``cu_seqlens``; each segment attends causally to itself only.
Consecutive segments of the same length form a *run*; a run of ``count`` segments of length ``n`` is a
``(count, n)`` view of the packed tokens, so it goes to ``scaled_dot_product_attention`` as one batched
causal call with no copy of Q, K or V. S2-Attn produces a handful of runs per document
(``[h] [G] x k [rest]``), so the work is that of plain grouped attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .eager import eager_attention
from .groups import equal_length_runs


def sdpa_varlen_attention(
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
    """Causal attention within each segment of packed sequences.

    Args:
        query: ``(T, Hq, D)`` packed queries (any strides with a unit last stride).
        key: ``(T, Hkv, D)``; ``Hq`` must be a multiple of ``Hkv`` (GQA without repeating K/V).
        value: ``(T, Hkv, D)``.
        cu_seqlens: ``[0, ..., T]`` segment boundaries (flash-attn's ``cu_seqlens``).
        scale: softmax scale, default ``D ** -0.5``.
        dropout_p: attention dropout probability (training only).
        softcap: tanh soft-capping of the scores; sinks: ``(Hq,)`` one sink logit per head. Either sends the runs
            to :func:`hf_longlora.attention.eager.eager_attention` (SDPA has neither).

    Returns:
        ``(T, Hq, D)``. Within a segment ``[s, e)``, token ``s + i`` attends tokens ``s .. s + i``
        (queries and keys of a segment have the same length, so top-left and bottom-right causal
        alignment agree).
    """
    total, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at {total} tokens, got {cu_seqlens[0]}..{cu_seqlens[-1]}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    gqa = num_heads != num_kv_heads

    runs = equal_length_runs(cu_seqlens)
    spans = [length * count for _, length, count in runs]
    # one split, not a slice per run: the backward of a split is one `cat` of the pieces' gradients, where
    # per-run slicing would allocate a zero-filled full-size gradient per run and add them up
    queries, keys, values = (t.split(spans, dim=0) for t in (query, key, value))
    outputs = []
    for (_, length, count), q, k, v in zip(runs, queries, keys, values, strict=True):
        span = length * count
        q = q.view(count, length, num_heads, head_dim).transpose(1, 2)  # (n, Hq, len, D)
        k = k.view(count, length, num_kv_heads, head_dim).transpose(1, 2)  # (n, Hkv, len, D)
        v = v.view(count, length, num_kv_heads, -1).transpose(1, 2)  # (n, Hkv, len, Dv)
        if softcap is None and sinks is None:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=length > 1, scale=scale, enable_gqa=gqa
            )  # (n, Hq, len, Dv)
        else:
            causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()  # (len, len)
            out = eager_attention(
                q,
                k,
                v,
                causal,
                scale=head_dim**-0.5 if scale is None else scale,
                softcap=softcap,
                sinks=sinks,
                dropout_p=dropout_p,
            )  # (n, Hq, len, Dv)
        outputs.append(out.transpose(1, 2).reshape(span, num_heads, -1))  # (n * len, Hq, Dv)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
