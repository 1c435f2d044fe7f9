"""flash-attn 2 varlen kernel (CUDA only), kept thin: the segment boundaries come from ``groups.plan_s2``
and are exercised on CPU by the tests against an emulation of ``flash_attn_varlen_func``'s contract."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def is_flash_attn_available() -> bool:
    """True when the ``flash_attn`` package is importable (it only builds and runs with CUDA)."""
    return importlib.util.find_spec("flash_attn") is not None


def use_flash_attn(query: torch.Tensor) -> bool:
    """flash-attn serves CUDA tensors in fp16/bf16 when installed; everything else goes to SDPA."""
    return query.is_cuda and query.dtype in FLASH_DTYPES and is_flash_attn_available()


def load_flash_attn_varlen_func() -> Callable:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def flash_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: Sequence[int],
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    varlen_func: Callable | None = None,
) -> torch.Tensor:
    """Same contract as :func:`hf_longlora.attention.sdpa.sdpa_varlen_attention`, on ``flash_attn_varlen_func``.

    Args:
        query: ``(T, Hq, D)``; key, value: ``(T, Hkv, D)`` with ``Hq % Hkv == 0`` (flash-attn does GQA).
        cu_seqlens: ``[0, ..., T]`` segment boundaries, the same for queries and keys.
        softcap: tanh soft-capping of the scores (flash-attn >= 2.6's ``softcap``); flash-attn 2 has no sinks,
            so sinks never come here.
        varlen_func: the kernel; defaults to flash-attn's (tests pass an emulation).
    """
    varlen_func = varlen_func or load_flash_attn_varlen_func()
    lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)]
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=query.device)
    max_len = max(lengths)
    return varlen_func(
        query,
        key,
        value,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=max_len,
        max_seqlen_k=max_len,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=True,
        **({"softcap": softcap} if softcap is not None else {}),
    )
