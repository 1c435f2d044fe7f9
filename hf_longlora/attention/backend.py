"""The ``s2_attention`` backend: transformers' AttentionInterface function and its mask registration.

When does S2-Attn apply? Only in a training forward (``module.training``) where queries and keys have the
same length. Eval mode, decoding with a KV cache (keys longer than queries) and non-causal modules get
exactly transformers' ``sdpa`` path: S2-Attn is a training-time approximation and the trained model runs
with full attention.

How is a batch read? Transformers hands us ``query (B, H, L, D)``, ``key/value (B, Hkv, L, D)`` and the
``sdpa`` mask (``None`` without padding, else bool ``(B, 1, L, L)``). We reduce the batch to *documents* laid
out one after another ("packed"), exactly as flash-attn's varlen API sees them:

- a row without padding is one document;
- a padded row (left or right) is one document made of its real tokens, so its groups start at its first
  real token and its outputs do not depend on how much padding it has (pad positions output zeros);
- a packed row (TRL ``padding_free``/``packing``: ``cu_seq_lens_q`` or restarting ``position_ids``) is one
  document per packed sequence: groups restart at each document and nothing crosses documents.

``groups.plan_s2`` turns the document lengths into segment boundaries for both head halves and a varlen
kernel (SDPA runs here, flash-attn on CUDA) does causal attention inside each segment. A mask that is not
plain padding/packing (a custom 4D mask, a sliding window narrower than the groups) is honoured by a dense
fallback: the model's mask AND the S2 pattern, with a one-time warning.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

from .eager import eager_attention
from .flash import flash_varlen_attention, use_flash_attn
from .groups import S2Plan, gqa_pieces, plan_s2, split_heads
from .sdpa import sdpa_varlen_attention
from .settings import S2Settings, install_config_knobs

logger = logging.get_logger(__name__)

S2_ATTENTION = "s2_attention"
_UNSUPPORTED_KWARGS = ("position_bias",)
# the attention-sink kwarg names models pass (gpt-oss and its kin: ``s_aux``)
_SINK_KWARGS = ("s_aux", "sinks")
# rows of the mask checked at a time when verifying its structure (bounds the temporary memory)
_VERIFY_ROWS = 1024


@dataclass
class _Layout:
    """How a ``(B, L)`` batch maps onto packed documents (holds no reference to the mask itself)."""

    document_lengths: list[int]
    # (T,) flat index ``b * L + i`` of each packed token; None when every token of every row is real
    token_index: torch.Tensor | None
    # "plain": no mask or padding/packing only; "window": that AND a sliding window of `window` tokens;
    # "dense": anything else (the dense fallback applies the model's mask)
    mask_kind: str
    window: int | None
    valid: torch.Tensor | None  # (B, L) bool: real tokens; None = all real
    document_ids: torch.Tensor | None  # (B, L) int64 globally distinct ids; None = one per row
    # plans per S2 settings, with the roll order as a tensor (built once per forward, shared by the layers)
    plans: dict = field(default_factory=dict)


class _LayoutCache:
    """One-entry cache: all layers of a forward (and its recomputation) share the same mask objects."""

    def __init__(self) -> None:
        self.entry: tuple = (None, (), None)

    @staticmethod
    def _key_of(objs, shape):
        # inference tensors have no version counter (torch.inference_mode)
        return (
            shape,
            tuple(
                (id(o), None if o.is_inference() else o._version) if isinstance(o, torch.Tensor) else o
                for o in objs
            ),
        )

    def get(self, objs, shape) -> _Layout | None:
        key, refs, layout = self.entry  # one read: replicas in threads never mix entries
        if layout is None or key != self._key_of(objs, shape):
            return None
        # ids can be reused after garbage collection: the weak references must still point to the objects
        for ref, obj in zip(refs, objs, strict=True):
            if isinstance(obj, torch.Tensor) and ref() is not obj:
                return None
        return layout

    def put(self, objs, shape, layout: _Layout) -> None:
        refs = tuple(weakref.ref(o) if isinstance(o, torch.Tensor) else None for o in objs)
        self.entry = (self._key_of(objs, shape), refs, layout)


_layout_cache = _LayoutCache()

# How many attention calls took each path since import: "s2" (S2-Attn) or "full" (sdpa). Read by
# hf_longlora.training.callbacks.S2StateCallback to show that training steps use S2 and evaluation uses full attention.
ATTENTION_CALLS = {"s2": 0, "full": 0}


def _document_ids(batch: int, length: int, position_ids, cu_seq_lens, device) -> torch.Tensor | None:
    """(B, L) ids, distinct across rows and documents, or None when each row is one document."""
    if cu_seq_lens is not None:
        cu = [int(x) for x in cu_seq_lens.tolist()]
        if cu[0] != 0 or cu[-1] != batch * length:
            raise ValueError(
                f"cu_seq_lens_q must run from 0 to batch * seq_len = {batch * length} (a flattened, padding-free "
                f"batch), got {cu[0]}..{cu[-1]}"
            )
        starts = set(cu)
        missing = [b * length for b in range(batch) if b * length not in starts]
        if missing:
            raise ValueError(
                f"cu_seq_lens_q has a document crossing a batch row boundary (at flat token {missing[0]})"
            )
        lengths = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:], strict=True)], device=device)
        ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        return ids.view(batch, length)
    if position_ids is None:
        return None
    pos = position_ids.to(device).expand(batch, -1)
    # transformers' rule (masking_utils.find_packed_sequence_indices): a document starts wherever the
    # position does not continue the previous one
    restart = torch.ones_like(pos, dtype=torch.bool)
    restart[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not restart[:, 1:].any():
        return None
    return restart.flatten().cumsum(0).view(batch, length) - 1


def _mask_matches(
    mask: torch.Tensor, valid: torch.Tensor, document_ids: torch.Tensor | None, window: int | None = None
) -> bool:
    """Is the bool ``(B, 1, L, L)`` mask exactly causal & same-document & real-key (& within ``window``: i - j <
    window, transformers' sliding window) on every real query row?"""
    batch, length = valid.shape
    cols = torch.arange(length, device=mask.device)
    for start in range(0, length, _VERIFY_ROWS):
        rows = torch.arange(start, min(length, start + _VERIFY_ROWS), device=mask.device)
        expected = (cols[None, None, :] <= rows[None, :, None]) & valid[:, None, :]  # (B, r, L)
        if window is not None:
            expected &= cols[None, None, :] > rows[None, :, None] - window
        if document_ids is not None:
            expected &= document_ids[:, rows, None] == document_ids[:, None, :]
        got = mask[:, 0, rows, :]
        if ((got != expected) & valid[:, rows, None]).any():
            return False
    return True


def _analyse_batch(
    attention_mask, batch: int, length: int, kwargs: dict, device, *, documents_from_positions: bool = False
) -> _Layout:
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    # position_ids only mark documents when transformers built a mask from them (packed detection);
    # without a mask, sdpa attends across them, and so do we. Under sequence parallelism the mask is dropped and
    # the gathered position_ids are the only record of the documents (``documents_from_positions``).
    use_positions = attention_mask is not None or documents_from_positions
    position_ids = kwargs.get("position_ids") if use_positions else None
    objs = (attention_mask, cu_seq_lens, position_ids)
    cached = _layout_cache.get(objs, (batch, length))
    if cached is not None:
        return cached

    document_ids = _document_ids(batch, length, position_ids, cu_seq_lens, device)
    valid = None
    mask_kind, window = "plain", None
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (length, length):
            raise ValueError(
                f"s2_attention expects a 4D (batch, 1, {length}, {length}) attention mask in training, got shape "
                f"{tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype == torch.bool:
            # a real token attends to itself, padding does not: the diagonal marks the real tokens
            valid = torch.diagonal(attention_mask[:, 0], dim1=-2, dim2=-1).expand(batch, length).clone()
            sliding = kwargs.get("sliding_window")
            if attention_mask.shape[1] != 1:
                mask_kind = "dense"
            elif _mask_matches(attention_mask, valid, document_ids):
                mask_kind = "plain"
            elif sliding is not None and _mask_matches(
                attention_mask, valid, document_ids, window=int(sliding)
            ):
                mask_kind, window = "window", int(sliding)
            else:
                mask_kind = "dense"
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
            mask_kind = "dense"
        if bool(valid.all()):
            valid = None

    flat_ids = (
        document_ids.flatten()
        if document_ids is not None
        else torch.arange(batch, device=device).repeat_interleave(length)
    )
    if valid is None:
        token_index = None
        kept = flat_ids
    else:
        token_index = valid.flatten().nonzero().squeeze(1)
        kept = flat_ids.index_select(0, token_index)
    if kept.numel() == 0:
        lengths: list[int] = []
    else:
        _, counts = torch.unique_consecutive(kept, return_counts=True)
        lengths = counts.tolist()
    layout = _Layout(lengths, token_index, mask_kind, window, valid, document_ids)
    _layout_cache.put(objs, (batch, length), layout)
    return layout


def _plan_for(layout: _Layout, settings: S2Settings, device) -> tuple[S2Plan, torch.Tensor | None]:
    """The S2 plan of a layout for these settings, and the roll order on `device` (cached on the layout)."""
    key = (settings, str(device))
    if key not in layout.plans:
        plan = plan_s2(
            layout.document_lengths,
            group_size=settings.group_size,
            group_size_ratio=settings.group_size_ratio,
            shift=settings.shift,
        )
        order = (
            None
            if plan.shifted_permutation is None
            else torch.tensor(plan.shifted_permutation, device=device)
        )
        layout.plans[key] = (plan, order)
    return layout.plans[key]


def _needs_dense(layout: _Layout, plan: S2Plan) -> bool:
    """A sliding window wider than every S2 segment changes nothing (S2 AND window == S2); otherwise go dense."""
    if layout.mask_kind == "plain":
        return False
    if layout.mask_kind == "window" and plan.shifted_permutation is None:
        return max(plan.max_unshifted, plan.max_shifted) > layout.window
    return True


def _attend_packed(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: S2Plan,
    order: torch.Tensor | None,
    *,
    scale: float | None,
    dropout: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    global_heads: tuple[int, int] | None = None,
) -> torch.Tensor:
    """S2-Attn over packed tokens: ``query (T, H, D)``, ``key/value (T, Hkv, D)`` -> ``(T, H, Dv)``.

    ``softcap`` (tanh capping of the scores) and ``sinks`` (``(H,)``, one sink logit per head) go to the eager
    kernel (:mod:`.eager`), or to flash-attn for softcap alone on CUDA.

    The heads are cut into pieces (``gqa_pieces`` of each half), each attending with its own segments. Q, K
    and V are cut with one ``split`` each rather than a slice per piece: the backward of a split is a single
    ``cat`` of the pieces' gradients, while slicing would allocate a zero-filled full-size gradient per slice.
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    rep = num_heads // num_kv_heads
    # flash-attn 2 has softcap but no sinks; SDPA has neither (sdpa_varlen_attention then computes eagerly)
    varlen = flash_varlen_attention if use_flash_attn(query) and sinks is None else sdpa_varlen_attention
    extra = {"softcap": softcap} if softcap is not None else {}
    unshifted, shifted = split_heads(num_heads, global_heads)
    pieces = [
        (q_heads, kv_heads, cu_seqlens, permutation)
        for heads, cu_seqlens, permutation in (
            (unshifted, plan.unshifted_cu_seqlens, None),
            (shifted, plan.shifted_cu_seqlens, order),
        )
        for q_heads, kv_heads in gqa_pieces(heads, rep)
    ]
    queries = query.split([len(q_heads) for q_heads, *_ in pieces], dim=1)  # query pieces are disjoint
    # the two halves can share one KV head (odd GQA, e.g. 9 query / 3 KV heads): split at every piece border
    bounds = sorted({b for _, kv_heads, *_ in pieces for b in (kv_heads.start, kv_heads.stop)})
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    key_parts = dict(zip(bounds, key.split(sizes, dim=1), strict=False))  # first KV head -> (T, n, D)
    value_parts = dict(zip(bounds, value.split(sizes, dim=1), strict=False))

    def kv_piece(parts: dict, heads: range) -> torch.Tensor:
        chunks = [parts[b] for b in bounds[:-1] if heads.start <= b < heads.stop]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)

    outputs = []
    for q, (q_heads, kv_heads, cu_seqlens, permutation) in zip(queries, pieces, strict=True):
        k, v = kv_piece(key_parts, kv_heads), kv_piece(value_parts, kv_heads)  # (T, hkv, D)
        if permutation is not None:  # "roll": the paper's order, wrap-around included
            q, k, v = (t.index_select(0, permutation) for t in (q, k, v))
        if sinks is not None:
            extra["sinks"] = sinks[q_heads.start : q_heads.stop]  # this piece's heads
        out = varlen(q, k, v, cu_seqlens, scale=scale, dropout_p=dropout, **extra)  # (T, h, Dv)
        if permutation is not None:  # roll back
            out = torch.empty_like(out).index_copy(0, permutation, out)
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (T, H, Dv)


def _allowed_by_plan(plan: S2Plan, layout: _Layout, batch: int, length: int, device) -> torch.Tensor:
    """Dense ``(2, B, L, L)`` bool: which keys each query may see under S2 (per head half)."""
    total = plan.total_tokens
    flat_index = (
        layout.token_index if layout.token_index is not None else torch.arange(batch * length, device=device)
    )
    halves = []
    for cu, permutation in (
        (plan.unshifted_cu_seqlens, None),
        (plan.shifted_cu_seqlens, plan.shifted_permutation),
    ):
        # rank[t]: place of packed token t in the half's order; segment[t]: its segment
        rank = torch.arange(total, device=device)
        if permutation is not None:
            rank = torch.empty_like(rank).index_copy(0, torch.tensor(permutation, device=device), rank)
        bounds = torch.tensor(cu[1:], device=device)
        segment = torch.searchsorted(bounds, rank, right=True)
        seg_grid = torch.full((batch * length,), -1, device=device, dtype=torch.long)
        rank_grid = torch.zeros(batch * length, device=device, dtype=torch.long)
        seg_grid[flat_index] = segment
        rank_grid[flat_index] = rank
        seg_grid, rank_grid = seg_grid.view(batch, length), rank_grid.view(batch, length)
        allowed = (
            (seg_grid[:, :, None] == seg_grid[:, None, :])
            & (seg_grid[:, :, None] >= 0)
            & (rank_grid[:, None, :] <= rank_grid[:, :, None])
        )
        halves.append(allowed)
    return torch.stack(halves)


def _attend_dense(
    query, key, value, model_mask, layout: _Layout, plan: S2Plan, *, scale, dropout, softcap=None, sinks=None,
    global_heads=None,
) -> torch.Tensor:  # fmt: skip
    """Fallback for masks beyond padding/packing: the model's mask AND the S2 pattern, per head half."""
    batch, num_heads, length, _ = query.shape
    rep = num_heads // key.shape[1]
    allowed = _allowed_by_plan(plan, layout, batch, length, query.device)  # (2, B, L, L)
    if model_mask is None:  # a layout that needs no mask but is sent here (not expected): allow everything
        model_mask = torch.ones(1, 1, length, length, dtype=torch.bool, device=query.device)
    valid = layout.valid if layout.valid is not None else torch.ones(batch, length, dtype=torch.bool)
    valid = valid.to(query.device)
    eye = torch.eye(length, dtype=torch.bool, device=query.device)
    outputs = []
    for half, heads in enumerate(split_heads(num_heads, global_heads)):
        if len(heads) == 0:
            continue
        for q_heads, kv_heads in gqa_pieces(heads, rep):
            mask_heads = slice(q_heads.start, q_heads.stop) if model_mask.shape[1] > 1 else slice(None)
            m = model_mask[:, mask_heads]
            if m.dtype == torch.bool:
                keep = m & allowed[half][:, None]
                # a row with nothing to attend (padding) sees itself, so softmax stays finite; zeroed below
                keep = keep | (eye & ~keep.any(-1, keepdim=True))
            else:
                keep = m.masked_fill(~allowed[half][:, None], float("-inf"))
                empty = torch.isinf(keep).all(-1, keepdim=True) & eye
                keep = keep.masked_fill(empty, 0.0)
            q, k, v = (
                query[:, q_heads.start : q_heads.stop],
                key[:, kv_heads.start : kv_heads.stop],
                value[:, kv_heads.start : kv_heads.stop],
            )
            if softcap is not None or sinks is not None:
                outputs.append(
                    eager_attention(
                        q,
                        k,
                        v,
                        keep,
                        scale=scale if scale is not None else query.shape[-1] ** -0.5,
                        softcap=softcap,
                        sinks=None if sinks is None else sinks[q_heads.start : q_heads.stop],
                        dropout_p=dropout,
                    )  # fmt: skip
                )
                continue
            outputs.append(
                F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=keep,
                    dropout_p=dropout,
                    scale=scale,
                    enable_gqa=len(q_heads) != len(kv_heads),
                )
            )
    out = torch.cat(outputs, dim=1).transpose(1, 2)  # (B, L, H, Dv)
    out = torch.where(valid[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.contiguous()  # as transformers' sdpa returns it: models .view() the output


def s2_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    global_heads: tuple[int, int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Shifted sparse attention (LongLoRA's S2-Attn) with transformers' attention-function signature.

    Args:
        module: the attention module (reads ``module.config`` knobs and ``module.training``).
        query: ``(B, H, L, D)``.
        key: ``(B, Hkv, L, D)``, GQA not repeated (``H % Hkv == 0``).
        value: ``(B, Hkv, L, Dv)``.
        attention_mask: the ``sdpa`` mask: ``None`` or bool ``(B, 1, L, L)``, True = attend.
        dropout: attention dropout probability.
        scaling: softmax scale.
        global_heads: ``(first, total)`` under sequence parallelism (:mod:`.ulysses`): these ``H`` heads are the
            model's heads ``first .. first + H - 1`` of ``total``, each shifted or not by its global index, and
            the documents come from ``position_ids`` (the mask is dropped). ``None``: all the heads.
        **kwargs: ``position_ids``, ``cu_seq_lens_q``/``cu_seq_lens_k`` for packed batches, ...

    Returns:
        ``(attn_output (B, L, H, Dv), None)``.

    In training, with G the group size of a document and h = G // 2 (positions counted from the
    document's first real token)::

        unshifted heads (first H - H//2)     shifted heads (last H//2), "partition"
        i attends j iff j <= i and           groups [0, h), [h, h+G), [h+2G, ...), last partial;
        i // G == j // G                     i attends j iff j <= i in the same group

    Nothing wraps around, so no token ever sees a later token. ``s2_shift="roll"`` reproduces the paper's
    roll (the first h tokens share a group with the last h and see them).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    softcap = kwargs.get("softcap")
    sinks = next((kwargs[name] for name in _SINK_KWARGS if kwargs.get(name) is not None), None)
    if not module.training or q_len != kv_len or q_len <= 1 or not causal:
        if module.training and not causal:
            logger.warning_once("s2_attention: non-causal attention module, using full sdpa attention.")
        ATTENTION_CALLS["full"] += 1
        if softcap is not None or sinks is not None or kwargs.get("position_bias") is not None:
            # transformers' sdpa drops sinks and refuses softcap: the model's own eager attention is exact
            return model_eager_attention(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"s2_attention does not support `{name}`; use attn_implementation='eager' for this model"
            )

    settings = S2Settings.from_config(module.config)
    ATTENTION_CALLS["s2"] += 1
    batch, num_heads, length, head_dim = query.shape
    if num_heads % key.shape[1]:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({key.shape[1]})")
    if global_heads is not None:
        _check_sequence_parallel_call(global_heads, num_heads, length, kwargs)
        if sinks is not None and sinks.shape[0] == global_heads[1] != num_heads:  # the module's (H,) sinks
            sinks = sinks[global_heads[0] : global_heads[0] + num_heads]
    layout = _analyse_batch(
        attention_mask, batch, length, kwargs, query.device, documents_from_positions=global_heads is not None
    )
    plan, order = _plan_for(layout, settings, query.device)
    if _needs_dense(layout, plan):
        logger.warning_once(
            "s2_attention: the attention mask is more than padding/packing (a custom 4D mask, or a sliding window "
            "narrower than the S2 groups); applying S2-Attn on top of it with a dense mask, which is slower."
        )
        return _attend_dense(
            query, key, value, attention_mask, layout, plan, scale=scaling, dropout=dropout,
            softcap=softcap, sinks=sinks, global_heads=global_heads,
        ), None  # fmt: skip

    # (B, H, L, D) is a transposed view of (B, L, H, D) in transformers' models: packing it is free
    q = query.transpose(1, 2).reshape(batch * length, num_heads, head_dim)  # (B*L, H, D)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)  # (B*L, Hkv, D)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], value.shape[-1])  # (B*L, Hkv, Dv)
    if layout.token_index is not None:  # drop padding
        q, k, v = (t.index_select(0, layout.token_index) for t in (q, k, v))
    if plan.total_tokens == 0:
        return query.new_zeros(batch, length, num_heads, value.shape[-1]), None
    out = _attend_packed(
        q, k, v, plan, order, scale=scaling, dropout=dropout,
        softcap=softcap, sinks=sinks, global_heads=global_heads,
    )  # (T, H, Dv)  # fmt: skip
    if layout.token_index is not None:  # pad positions output zeros
        out = out.new_zeros(batch * length, num_heads, out.shape[-1]).index_copy(0, layout.token_index, out)
    return out.view(batch, length, num_heads, -1), None


def _check_sequence_parallel_call(
    global_heads: tuple[int, int], num_heads: int, length: int, kwargs: dict
) -> None:
    first, total = global_heads
    if not 0 <= first <= total - num_heads:
        raise ValueError(
            f"global_heads={global_heads}: {num_heads} local heads must lie within the model's {total}"
        )
    if kwargs.get("position_ids") is None:
        raise ValueError(
            "s2_attention under sequence parallelism needs the gathered position_ids (the mask is dropped)"
        )
    window = kwargs.get("sliding_window")
    if window is not None and int(window) < length:
        raise ValueError(
            f"s2_attention under sequence parallelism: this layer has a sliding window of {window} tokens, which "
            "DeepSpeed's Ulysses drops with the mask; train this model without sequence_parallel_size"
        )


def additive_mask(
    attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor:
    """The additive float mask models' eager attention adds to the scores, from the ``sdpa`` mask: None means
    causal (bottom-right aligned: query i of Lq sees keys up to Lk - Lq + i), bool True means attend."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = keep[None, None]  # (1, 1, Lq, Lk)
    if attention_mask.dtype != torch.bool:
        return attention_mask
    minimum = torch.finfo(query.dtype).min
    return torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~attention_mask, minimum
    )


def model_eager_attention(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """Full attention with the model's own ``eager_attention_forward`` (found in the module's modeling file): the
    exact reference for models whose attention has sinks or soft-capping, in evaluation and generation."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__} passes attention sinks or softcap but its module has no "
            "eager_attention_forward to evaluate them exactly; use attn_implementation='eager' for evaluation"
        )
    out, _ = eager(module, query, key, value, additive_mask(attention_mask, query, key), **kwargs)
    return out, None


def register_s2_attention() -> None:
    """Register ``s2_attention`` with transformers (attention function, its mask, the config knobs).

    Idempotent; ``import hf_longlora`` calls it. The mask function is transformers' ``sdpa_mask``: without
    a registered mask function transformers would pass ``attention_mask=None`` and padding would be lost.
    """
    AttentionInterface.register(S2_ATTENTION, s2_attention_forward)
    AttentionMaskInterface.register(S2_ATTENTION, sdpa_mask)
    install_config_knobs()
    _refuse_models_without_attention_interface()


def _uses_s2(implementation) -> bool:
    if isinstance(implementation, dict):
        return any(_uses_s2(v) for v in implementation.values())
    return implementation == S2_ATTENTION


# models whose attention goes through AttentionInterface but only works with eager's additive float mask
FLOAT_MASK_ONLY = {
    "deepseek_v4": (
        "it appends its compressed-key bias to the attention mask with `block_bias.to(attention_mask.dtype)`, which "
        "inverts it for the boolean mask that s2_attention (like sdpa) receives: compressed keys are hidden from "
        "the queries that should see them and shown to the others (tools/probe_models.py: eval logits off by 0.9)"
    ),
}


def check_model_supports_s2(model_class: type, model_type: str | None) -> None:
    """Refuse a model whose attention does not go through transformers' AttentionInterface (its class says
    ``_supports_attention_backend = False``: bloom, falcon, gpt_neo, mpt, xglm, ...). transformers would accept the
    name, S2-Attn would never run, and the model would get a mask format it does not expect (causality breaks).
    Also refuse the models of :data:`FLOAT_MASK_ONLY`, which only work with eager's float mask."""
    if model_type in FLOAT_MASK_ONLY:
        raise ValueError(
            f"{model_class.__name__} (model_type {model_type!r}) cannot run attn_implementation='s2_attention': "
            f"{FLOAT_MASK_ONLY[model_type]}. Use attn_implementation='eager' (plain LoRA, no S2-Attn)."
        )
    if getattr(model_class, "_supports_attention_backend", False):
        return
    raise ValueError(
        f"{model_class.__name__} (model_type {model_type!r}) computes attention in its own code, not through "
        "transformers' AttentionInterface, so attn_implementation='s2_attention' cannot run S2-Attn there. Use it with "
        "attn_implementation='sdpa' or 'eager' (plain LoRA, no S2-Attn), or a model family that supports it "
        "(docs/models.md lists them: Llama, Mistral, Qwen, Gemma, GPT-NeoX, GPT-2, OPT, ...)."
    )


def _refuse_models_without_attention_interface() -> None:
    """Wrap ``PreTrainedModel._check_and_adjust_attn_implementation`` (run in every model's ``__init__``, before its
    layers are built) so that choosing ``s2_attention`` for such a model fails at once with
    :func:`check_model_supports_s2`'s message. Idempotent; other implementations pass through untouched."""
    from transformers import PreTrainedModel

    original = PreTrainedModel._check_and_adjust_attn_implementation
    if getattr(original, "_hf_longlora_checked", False):
        return

    def checked(self, attn_implementation, *args, **kwargs):
        if _uses_s2(attn_implementation):
            check_model_supports_s2(type(self), getattr(self.config, "model_type", None))
        return original(self, attn_implementation, *args, **kwargs)

    checked._hf_longlora_checked = True
    checked.__wrapped__ = original
    checked.__doc__ = original.__doc__
    PreTrainedModel._check_and_adjust_attn_implementation = checked


# importing this module first (before transformers' modeling code) must register too: see hf_longlora._registration
register_s2_attention()
