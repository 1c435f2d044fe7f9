"""The pure group arithmetic (no transformers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hf_longlora.attention.groups import (
    cu_seqlens_from_lengths,
    equal_length_runs,
    gqa_pieces,
    group_size_for,
    plan_s2,
    roll_permutation,
    shifted_segment_lengths,
    split_heads,
    unshifted_segment_lengths,
)


def test_segment_lengths_examples():
    assert unshifted_segment_lengths(10, 4) == [4, 4, 2]
    assert shifted_segment_lengths(10, 4) == [2, 4, 4]
    assert shifted_segment_lengths(11, 4) == [2, 4, 4, 1]
    assert shifted_segment_lengths(12, 5) == [2, 5, 5]
    assert unshifted_segment_lengths(5, 8) == [5] and shifted_segment_lengths(5, 8) == [5]
    assert shifted_segment_lengths(3, 1) == [1, 1, 1]  # h = 0: no leading half group
    assert unshifted_segment_lengths(0, 4) == []


def test_group_size_rule():
    assert group_size_for(1000, None, 0.25) == 250
    assert group_size_for(1000, 64, 0.25) == 64  # fixed size wins
    assert group_size_for(3, None, 0.25) == 1  # clamped
    assert group_size_for(10, None, 1.0) == 10


def test_roll_permutation_is_torch_roll():
    import torch

    x = torch.arange(12)
    assert roll_permutation(12, 4) == torch.roll(x, -2).tolist()
    assert roll_permutation(5, 8) == [0, 1, 2, 3, 4]


def test_split_heads_is_torch_chunk():
    import torch

    for h in range(1, 12):
        first, second = torch.arange(h).chunk(2) if h > 1 else (torch.arange(1), torch.arange(0))
        unshifted, shifted = split_heads(h)
        assert list(unshifted) == first.tolist() and list(shifted) == second.tolist()


def test_gqa_pieces_example_smollm2():
    # 9 heads / 3 KV heads: unshifted 0-4 read KV 0,0,0,1,1; shifted 5-8 read 1,2,2,2
    assert gqa_pieces(range(0, 5), 3) == [(range(0, 3), range(0, 1)), (range(3, 5), range(1, 2))]
    assert gqa_pieces(range(5, 9), 3) == [(range(5, 6), range(1, 2)), (range(6, 9), range(2, 3))]


@given(st.integers(1, 32), st.integers(1, 8), st.integers(0, 32), st.integers(0, 32))
def test_gqa_pieces_cover_heads_with_whole_kv_groups(kv_heads, rep, a, b):
    heads = kv_heads * rep
    lo, hi = sorted((min(a, heads), min(b, heads)))
    pieces = gqa_pieces(range(lo, hi), rep)
    covered = [h for q, _ in pieces for h in q]
    assert covered == list(range(lo, hi))
    for q, kv in pieces:
        assert len(q) % len(kv) == 0
        assert all(h // rep == kv[(i * len(kv)) // len(q)] for i, h in enumerate(q))


def test_runs_merge_equal_adjacent_segments():
    assert equal_length_runs([0, 2, 6, 10, 12, 14, 18]) == [(0, 2, 1), (2, 4, 2), (10, 2, 2), (14, 4, 1)]
    assert equal_length_runs([0]) == []


@given(
    st.lists(st.integers(0, 80), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(2, 20)),
    st.sampled_from([0.1, 0.25, 0.5, 1.0]),
)
def test_partition_plan_properties(lengths, group, ratio):
    plan = plan_s2(lengths, group_size=group, group_size_ratio=ratio)
    total = sum(lengths)
    assert plan.unshifted_cu_seqlens[-1] == total and plan.shifted_cu_seqlens[-1] == total
    assert plan.shifted_permutation is None
    doc_starts = set(cu_seqlens_from_lengths(lengths))
    for cu in (plan.unshifted_cu_seqlens, plan.shifted_cu_seqlens):
        assert doc_starts <= set(cu)  # no segment crosses a document
        assert all(b > a for a, b in zip(cu[:-1], cu[1:], strict=True))


def test_roll_plan_and_error():
    plan = plan_s2([8, 4], group_size=4, group_size_ratio=0.25, shift="roll")
    assert plan.shifted_cu_seqlens == [0, 4, 8, 12]
    # the second document (4 tokens, G = 4 >= L) is plain causal: it does not move
    assert plan.shifted_permutation == [2, 3, 4, 5, 6, 7, 0, 1, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="multiple of the group size"):
        plan_s2([10], group_size=4, group_size_ratio=0.25, shift="roll")
    with pytest.raises(ValueError, match="s2_shift must be one of"):
        plan_s2([10], group_size=4, group_size_ratio=0.25, shift="circular")


def test_groups_module_does_not_import_transformers():
    """The group arithmetic stands alone: loading the file pulls in neither torch nor transformers."""
    import subprocess
    import sys

    from hf_longlora.attention import groups

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('groups', {groups.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['groups'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(module.plan_s2([10], group_size=4, group_size_ratio=0.25).shifted_cu_seqlens)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[0, 2, 6, 10]", "False False"]
