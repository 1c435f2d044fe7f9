"""Pure group arithmetic for S2-Attn: group sizes, segment boundaries (cu_seqlens) and the roll permutation.

Nothing here imports transformers or touches tensors' values: every function maps document lengths to
integer boundaries, so the S2 pattern can be checked on its own and shared by every kernel (SDPA runs,
flash-attn varlen).

Vocabulary. Tokens are laid out "packed": the documents of a batch one after another, ``T`` tokens in all.
A *segment* is a run of consecutive packed tokens that attend causally among themselves and to nothing
else. S2-Attn turns each document into segments twice, once per head half:

    document of L = 10 tokens, group size G = 4 (h = G // 2 = 2)

    position            0 1 2 3 4 5 6 7 8 9
    unshifted heads    [0 1 2 3|4 5 6 7|8 9]          groups [0, G), [G, 2G), ... last one partial
    shifted, partition [0 1|2 3 4 5|6 7 8 9]          groups [0, h), [h, h+G), ... nothing wraps around
    shifted, roll       paper's Algorithm 1: roll by -h, group, roll back; needs L % G == 0 and the
                        first h tokens share a group with the last h (they see the future)
    shifted, none      [0 1 2 3|4 5 6 7|8 9]          no shift: every head as the unshifted ones (the paper's
                                                      "short attention" ablation; no information crosses groups)

``cu_seqlens`` follows flash-attn's convention: ``[0, end_0, end_1, ..., T]``, segment ``i`` spans packed
tokens ``[cu_seqlens[i], cu_seqlens[i + 1])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SHIFT_MODES = ("partition", "roll", "none")


def group_size_for(length: int, group_size: int | None, group_size_ratio: float) -> int:
    """The S2 group size G for a document of ``length`` tokens.

    ``group_size`` (fixed) wins over ``group_size_ratio``; with the ratio, ``G = int(length * ratio)``,
    clamped to at least 1 (only documents shorter than ``1 / ratio`` tokens reach the clamp). A result
    ``G >= length`` means the document gets plain causal attention.
    """
    if group_size is not None:
        return group_size
    return max(1, int(length * group_size_ratio))


def unshifted_segment_lengths(length: int, group: int) -> list[int]:
    """Segment lengths of one document for the unshifted heads: ``[G, G, ..., rest]``."""
    if group >= length:
        return [length] if length > 0 else []
    full, rest = divmod(length, group)
    return [group] * full + ([rest] if rest else [])


def shifted_segment_lengths(length: int, group: int) -> list[int]:
    """Segment lengths of one document for the shifted heads in "partition" mode: ``[h, G, ..., rest]``."""
    if group >= length:
        return [length] if length > 0 else []
    half = group // 2
    return ([half] if half else []) + unshifted_segment_lengths(length - half, group)


def roll_permutation(length: int, group: int) -> list[int]:
    """Positions of one document in the paper's rolled order: rolled token ``p`` is original ``(p + h) % L``.

    This is ``torch.roll(x, -h)`` along the sequence; its inverse rolls back by ``+h``.
    """
    if group >= length:
        return list(range(length))
    half = group // 2
    return [(p + half) % length for p in range(length)]


def cu_seqlens_from_lengths(lengths: Sequence[int]) -> list[int]:
    """``[0, l0, l0 + l1, ...]``: flash-attn's boundaries from segment lengths (zero lengths dropped)."""
    cu = [0]
    for n in lengths:
        if n < 0:
            raise ValueError(f"segment lengths must be >= 0, got {n}")
        if n:
            cu.append(cu[-1] + n)
    return cu


def equal_length_runs(cu_seqlens: Sequence[int]) -> list[tuple[int, int, int]]:
    """Merge consecutive segments of equal length: ``[(start, segment_length, count), ...]``.

    A run of ``count`` segments of the same length starting at ``start`` is one batched attention call
    over a ``(count, segment_length)`` view of the packed tokens, without copying them.
    """
    runs: list[tuple[int, int, int]] = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        n = end - start
        if n <= 0:
            continue
        if runs and runs[-1][1] == n and runs[-1][0] + runs[-1][1] * runs[-1][2] == start:
            first, seg, count = runs[-1]
            runs[-1] = (first, seg, count + 1)
        else:
            runs.append((start, n, 1))
    return runs


@dataclass(frozen=True)
class S2Plan:
    """Where attention may flow, per head half, for a packed batch of documents.

    Attributes:
        unshifted_cu_seqlens: segment boundaries for the first ``H - H // 2`` query heads.
        shifted_cu_seqlens: segment boundaries for the last ``H // 2`` query heads, in the packed order
            (partition) or in the rolled order given by ``shifted_permutation`` (roll).
        shifted_permutation: for "roll", packed index of each token in rolled order (gather with it
            before attention, scatter with it after); ``None`` when no token moves.
        max_unshifted: longest unshifted segment.
        max_shifted: longest shifted segment.
    """

    unshifted_cu_seqlens: list[int]
    shifted_cu_seqlens: list[int]
    shifted_permutation: list[int] | None
    max_unshifted: int
    max_shifted: int

    @property
    def total_tokens(self) -> int:
        return self.unshifted_cu_seqlens[-1]


def _max_segment(cu: Sequence[int]) -> int:
    return max((b - a for a, b in zip(cu[:-1], cu[1:], strict=True)), default=0)


def plan_s2(
    document_lengths: Sequence[int],
    *,
    group_size: int | None,
    group_size_ratio: float,
    shift: str = "partition",
) -> S2Plan:
    """Build the S2 segments of both head halves for documents laid out one after another.

    Args:
        document_lengths: token count of each document, in packed order (a padded row counts only its
            real tokens; a packed row contributes one entry per document).
        group_size: fixed group size G (wins over the ratio), or ``None``.
        group_size_ratio: ``G = int(L * ratio)`` per document when ``group_size`` is ``None``.
        shift: "partition" (causal, default), "roll" (the paper's Algorithm 1, wrap-around included) or "none"
            (no shift: the shifted half gets the unshifted groups, the paper's short-attention ablation).

    Raises:
        ValueError: "roll" with a document whose length is not a multiple of its group size.
    """
    if shift not in SHIFT_MODES:
        raise ValueError(f"s2_shift must be one of {SHIFT_MODES}, got {shift!r}")
    unshifted: list[int] = []
    shifted: list[int] = []
    permutation: list[int] = []
    rolled_any = False
    offset = 0
    for length in document_lengths:
        group = group_size_for(length, group_size, group_size_ratio)
        unshifted += unshifted_segment_lengths(length, group)
        if shift == "partition":
            shifted += shifted_segment_lengths(length, group)
        elif shift == "none":
            shifted += unshifted_segment_lengths(length, group)
        else:
            if group < length and length % group:
                raise ValueError(
                    f"s2_shift='roll' needs every sequence length to be a multiple of the group size, got a "
                    f"sequence of {length} tokens with group size {group}; use s2_shift='partition' (any "
                    "length, causal) or pad/pack to a multiple of the group size"
                )
            shifted += unshifted_segment_lengths(length, group)
            rolled_any = rolled_any or (group < length and group // 2 > 0)
            permutation += [offset + p for p in roll_permutation(length, group)]
        offset += length
    unshifted_cu = cu_seqlens_from_lengths(unshifted)
    shifted_cu = cu_seqlens_from_lengths(shifted)
    return S2Plan(
        unshifted_cu_seqlens=unshifted_cu,
        shifted_cu_seqlens=shifted_cu,
        shifted_permutation=permutation if rolled_any else None,
        max_unshifted=_max_segment(unshifted_cu),
        max_shifted=_max_segment(shifted_cu),
    )


def split_heads(num_heads: int, global_heads: tuple[int, int] | None = None) -> tuple[range, range]:
    """The two head halves as ``torch.chunk(2)`` splits them: first ``H - H // 2`` unshifted, last ``H // 2`` shifted.

    ``global_heads = (first, total)``: these ``num_heads`` heads are the model's heads ``first .. first +
    num_heads - 1`` of ``total`` (sequence parallelism gives each rank a slice); each keeps the half of its global
    index. Returns local ranges::

        total 9, 3 ranks:  global 0 1 2 | 3 4 5 | 6 7 8      (first 9 - 4 = 5 heads unshifted)
                           rank 0: all unshifted; rank 1: 3, 4 unshifted, 5 shifted; rank 2: all shifted
    """
    first, total = global_heads if global_heads is not None else (0, num_heads)
    boundary = total - total // 2  # the first shifted head, globally
    local = min(num_heads, max(0, boundary - first))
    return range(0, local), range(local, num_heads)


def gqa_pieces(heads: range, num_key_value_groups: int) -> list[tuple[range, range]]:
    """Split query heads into pieces that each map onto whole KV heads, so no K/V head is repeated.

    Query head ``q`` reads KV head ``q // num_key_value_groups``. A half that starts or ends inside a KV
    group (e.g. 9 heads / 3 KV heads: unshifted heads 0-4 read KV heads 0, 0, 0, 1, 1) is cut at the group
    borders. Returns ``[(query_heads, kv_heads), ...]`` with ``len(query_heads) % len(kv_heads) == 0``.
    """
    rep = num_key_value_groups
    pieces: list[tuple[range, range]] = []
    start, stop = heads.start, heads.stop
    while start < stop:
        kv = start // rep
        if start % rep == 0 and stop - start >= rep:
            # as many whole KV groups as fit
            kv_stop = stop // rep
            end = kv_stop * rep
            pieces.append((range(start, end), range(kv, kv_stop)))
        else:
            end = min(stop, (kv + 1) * rep)
            pieces.append((range(start, end), range(kv, kv + 1)))
        start = end
    return pieces
