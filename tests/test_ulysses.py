"""S2-Attn under DeepSpeed's Ulysses sequence parallelism: each rank's heads keep their global shift, documents come
from the gathered position_ids, and a few training steps across 2 or 3 gloo processes equal one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import attention_module, random_qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_attention

from hf_longlora.attention import backend
from hf_longlora.attention.groups import split_heads
from hf_longlora.attention.ulysses import check_sequence_parallel_model, register_s2_ulysses
from hf_longlora.training.sequence_parallel import shard_batch, shift_labels_of

TESTS = Path(__file__).resolve().parent


def test_split_heads_by_global_index():
    # 9 heads: the first 5 unshifted; with 3 ranks of 3 heads the boundary falls inside rank 1
    assert split_heads(9) == (range(0, 5), range(5, 9))
    assert [split_heads(3, (first, 9)) for first in (0, 3, 6)] == [
        (range(0, 3), range(3, 3)),
        (range(0, 2), range(2, 3)),
        (range(0, 0), range(0, 3)),
    ]
    assert [split_heads(4, (first, 8)) for first in (0, 4)] == [
        (range(0, 4), range(4, 4)),
        (range(0, 0), range(0, 4)),
    ]


@st.composite
def parallel_cases(draw):
    world = draw(st.sampled_from([2, 3, 4]))
    kv_heads = draw(st.sampled_from([n for n in (1, 2, 3, 4, 6) if n % world == 0 or world % n == 0]))
    heads = kv_heads * draw(st.integers(1, 3))
    if heads % world:
        heads *= world // torch.gcd(torch.tensor(heads), torch.tensor(world)).item()
    documents = draw(st.lists(st.integers(1, 30), min_size=1, max_size=3))
    return world, heads, kv_heads, documents


@settings(max_examples=25, deadline=None)
@given(case=parallel_cases(), seed=st.integers(0, 2**16))
def test_local_heads_equal_the_whole_attention(case, seed):
    """What Ulysses hands each rank (all tokens, heads [r H/sp, (r+1) H/sp), KV heads split or replicated, no
    mask, position_ids) through s2_attention_forward with global_heads, concatenated over the ranks, equals the
    fp64 reference of the whole attention."""
    world, heads, kv_heads, lengths = case
    total = sum(lengths)
    q, k, v = random_qkv(1, heads, kv_heads, total, 8, seed=seed)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    documents = [[list(range(s, s + n)) for s, n in zip(starts, lengths, strict=True)]]
    module = attention_module(heads // world, max(1, kv_heads // world), 8, s2_group_size=4)
    local_heads = heads // world
    outputs = []
    for rank in range(world):
        q_r = q[:, rank * local_heads : (rank + 1) * local_heads]
        if kv_heads >= world:
            local_kv = kv_heads // world
            k_r, v_r = (t[:, rank * local_kv : (rank + 1) * local_kv] for t in (k, v))
        else:  # DeepSpeed replicates each KV head to world / kv_heads ranks
            k_r, v_r = (t.repeat_interleave(world // kv_heads, dim=1)[:, rank : rank + 1] for t in (k, v))
        out, _ = backend.s2_attention_forward(
            module, q_r, k_r, v_r, None, position_ids=positions, global_heads=(rank * local_heads, heads)
        )
        outputs.append(out)
    expected = reference_attention(q, k, v, documents, group_size=4)
    torch.testing.assert_close(torch.cat(outputs, dim=2), expected, rtol=1e-12, atol=1e-12)


def test_sequence_parallel_calls_are_checked():
    module = attention_module(4, 2, 8, s2_group_size=4)
    q, k, v = random_qkv(1, 4, 2, 16, 8)
    positions = torch.arange(16)[None]
    with pytest.raises(ValueError, match="needs the gathered position_ids"):
        backend.s2_attention_forward(module, q, k, v, None, global_heads=(0, 8))
    with pytest.raises(ValueError, match="sliding window of 8 tokens, which DeepSpeed's Ulysses drops"):
        backend.s2_attention_forward(
            module, q, k, v, None, position_ids=positions, global_heads=(0, 8), sliding_window=8
        )
    with pytest.raises(ValueError, match=r"global_heads=\(6, 8\): 4 local heads"):
        backend.s2_attention_forward(module, q, k, v, None, position_ids=positions, global_heads=(6, 8))


def test_sequence_parallel_size_is_checked_before_any_work():
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=72)
    config._attn_implementation = "s2_attention"
    with pytest.raises(
        ValueError, match=r"must divide the model's 9 attention heads .*sizes that fit: \[3, 9\]"
    ):
        check_sequence_parallel_model(config, 2)
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        check_sequence_parallel_model(config, 0)
    with pytest.raises(ValueError, match="must be an integer >= 1, got True"):
        check_sequence_parallel_model(config, True)
    config = LlamaConfig(num_attention_heads=12, num_key_value_heads=3, hidden_size=96)
    config._attn_implementation = "s2_attention"
    with pytest.raises(ValueError, match="the model's 3 key/value heads: one must divide the other"):
        check_sequence_parallel_model(config, 4)
    config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="attn_implementation='s2_attention', got 'sdpa'"):
        check_sequence_parallel_model(config, 3)
    check_sequence_parallel_model(config, 1)  # no parallelism: nothing to check


def test_register_needs_torch_distributed():
    import ulysses_worker

    model = ulysses_worker.build(8, 2)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        register_s2_ulysses(model, sequence_parallel_size=2)
    assert register_s2_ulysses(model, sequence_parallel_size=1) is None


def test_shift_labels_stop_at_document_borders():
    labels = torch.tensor([[10, 11, 12, 20, 21, 30]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert shift_labels_of(labels, positions).tolist() == [[11, 12, -100, 21, -100, -100]]


def test_a_length_that_does_not_divide_is_padded_with_a_document_of_its_own():
    """64 tokens over 3 ranks: padded to 66 with a 2-token padding document, ignored by the loss; the real
    tokens' logits are those of the unpadded sequence (S2 groups follow the documents)."""
    import ulysses_worker

    batch = ulysses_worker.batch()
    shards = [shard_batch(batch, rank, 3) for rank in range(3)]
    assert [s["input_ids"].shape[1] for s in shards] == [22, 22, 22]
    whole = {key: torch.cat([s[key] for s in shards], dim=1) for key in shards[0]}
    assert whole["position_ids"][0, 64:].tolist() == [0, 1] and (whole["shift_labels"][0, 63:] == -100).all()
    assert torch.equal(whole["shift_labels"][:, :64], shift_labels_of(batch["labels"], batch["position_ids"]))
    model = ulysses_worker.build(8, 2).train()
    padded = model(input_ids=whole["input_ids"], position_ids=whole["position_ids"], use_cache=False).logits
    plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(padded[:, :64], plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs 'position_ids'"):
        shard_batch({"input_ids": batch["input_ids"]}, 0, 2)


@pytest.mark.slow
@pytest.mark.parametrize(("world", "heads", "kv_heads"), [(2, 8, 2), (3, 9, 3)])
def test_training_steps_across_processes_equal_one_process(tmp_path, world, heads, kv_heads):
    """4 SGD steps of LongLoRA on one packed row of 3 documents (27 + 20 + 17 tokens, borders not on the shards),
    split across `world` gloo processes with DeepSpeed's Ulysses: per-step losses and every adapter gradient
    equal one process on the whole row (fp32). 9 heads over 3 ranks puts the shifted/unshifted border inside
    rank 1, and 64 tokens over 3 ranks needs padding."""
    import ulysses_worker

    out = tmp_path / "parallel.pt"
    # the package this test imports (a mutated copy under tools/mutations.py) first, then tests/ for the worker
    package = str(Path(backend.__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([package, str(TESTS)])}
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--standalone",
        str(TESTS / "ulysses_worker.py"), str(out), str(heads), str(kv_heads),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    parallel = torch.load(out)
    assert parallel["s2_calls"] == ulysses_worker.STEPS * 2  # S2-Attn ran on every layer, every step
    losses, grads = ulysses_worker.train(ulysses_worker.build(heads, kv_heads))
    torch.testing.assert_close(parallel["losses"], losses, rtol=1e-6, atol=0)
    assert losses[-1] < losses[0] - 0.5  # the steps train
    for got, expected in zip(parallel["grads"], grads, strict=True):
        assert got.keys() == expected.keys()
        scale = max(g.abs().max().item() for g in expected.values())
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=0, atol=5e-6 * scale, msg=name)


# ------------------------------------------------------------------------------------------- the commands


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", ["ddp_cpu_2proc.yaml", "deepspeed_zero2_cpu_2proc.yaml"])
def test_train_cli_with_sequence_parallel_size_2_equals_one_process(
    tmp_path, tiny_checkpoint, corpus, accelerate_config
):
    """`hf-longlora train` with `sequence_parallel_size: 2` under accelerate (2 gloo processes, each holding 128 of
    the 256 tokens; DDP, and DeepSpeed ZeRO-2 whose engine reduces the gradients): the per-step losses and gradient norms are those of one process on whole blocks. The same
    blocks in the same order: accelerate gives rank r the blocks at places 2k + r of the seeded order, and
    Ulysses' data adapter runs rank 0's block, then rank 1's, each across both ranks."""
    from test_training import accelerate_launch, run_cli, train_config, trainer_log_history, write_yaml

    settings = dict(max_steps=4, save_steps=4, logging_steps=1, learning_rate=0.01)
    config = train_config(tmp_path, tiny_checkpoint, corpus, sequence_parallel_size=2, **settings)
    launch = accelerate_launch(
        TESTS.parent / "examples" / "accelerate" / accelerate_config,
        ["train", "--config", str(write_yaml(tmp_path / "sp.yaml", config))],
    )
    assert launch.returncode == 0, launch.stderr[-4000:]
    parallel = [h for h in trainer_log_history(tmp_path / "out") if "loss" in h]
    single_config = train_config(
        tmp_path, tiny_checkpoint, corpus, output_dir=str(tmp_path / "single"), **settings
    )
    result = run_cli(["train", "--config", str(write_yaml(tmp_path / "single.yaml", single_config))])
    assert result.returncode == 0, result.stderr[-4000:]
    single = [h for h in trainer_log_history(tmp_path / "single") if "loss" in h]
    assert len(parallel) == len(single) == 4
    assert [h["loss"] for h in parallel] == pytest.approx([h["loss"] for h in single], rel=1e-5, abs=0)
    assert [h["grad_norm"] for h in parallel] == pytest.approx(
        [h["grad_norm"] for h in single], rel=1e-4, abs=0
    )
    assert len({round(h["loss"], 3) for h in single}) == 4  # the steps differ: training moves


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        (
            {"sequence_parallel_size": 2},
            {},
            r"needs a multiple of 2 processes, got 1: start with `accelerate launch",
        ),
        (
            {"sequence_parallel_size": 3, "context_length": 264},
            {},
            r"must divide the model's 4 attention heads .*sizes that fit: \[2, 4\]",
        ),
        (
            {"sequence_parallel_size": 2, "context_length": 255},
            {},
            r"context_length=255 \(the block length\) must",
        ),
        ({"sequence_parallel_size": 0}, {}, r"sequence_parallel_size must be >= 1, got 0"),
        (
            {},
            {"PARALLELISM_CONFIG_CP_SIZE": "2"},
            r"cp_size=2: ring context parallelism .*`sequence_parallel_size: N`",
        ),
        ({}, {"PARALLELISM_CONFIG_SP_SIZE": "2"}, r"sp_size=2 in accelerate's .*`sequence_parallel_size: 2`"),
        (
            {"deepspeed": {"sequence_parallel_size": 4, "zero_optimization": {"stage": 2}}},
            {},
            r"sequence_parallel_size=4 in the DeepSpeed config: .*`sequence_parallel_size: 4` in the hf-longlora",
        ),
    ],
)
def test_bad_sequence_parallel_settings_fail_before_loading(
    tmp_path, tiny_checkpoint, corpus, extra, env, message, capsys, no_loading, monkeypatch
):
    import re

    from test_training import train_config, write_yaml

    from hf_longlora import cli

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = train_config(tmp_path, tiny_checkpoint, corpus, **extra)
    code = cli.main(["train", "--config", str(write_yaml(tmp_path / "c.yaml", config))])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sft_cli_with_sequence_parallel_size_2_equals_one_process(tmp_path, tiny_checkpoint):
    """`hf-longlora sft` with `sequence_parallel_size: 2`: records of odd and even lengths, padded to a multiple of
    2 with a padding document; per-step losses and gradient norms equal one process's. Groups of 1/4 of each
    record (not SFT's fixed default), so a padding that joined the last record would change its groups."""
    import json

    from test_training import accelerate_launch, longalpaca_records, run_cli, trainer_log_history, write_yaml

    data = tmp_path / "longalpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in longalpaca_records(12)))

    def config(**extra):
        return {
            "model_name_or_path": str(tiny_checkpoint), "data_files": [str(data)], "context_length": 256,
            "max_length": 256, "max_steps": 4, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
            "save_steps": 4, "logging_steps": 1, "learning_rate": 0.01, "use_cpu": True, "dtype": "float32",
            "padding_free": True, "s2_group_size_ratio": 0.25, **extra,
        }  # fmt: skip

    launch = accelerate_launch(
        TESTS.parent / "examples" / "accelerate" / "ddp_cpu_2proc.yaml",
        [
            "sft",
            "--config",
            str(
                write_yaml(
                    tmp_path / "sp.yaml", config(sequence_parallel_size=2, output_dir=str(tmp_path / "out"))
                )
            ),
        ],
    )
    assert launch.returncode == 0, launch.stderr[-4000:]
    single = run_cli(
        ["sft", "--config", str(write_yaml(tmp_path / "one.yaml", config(output_dir=str(tmp_path / "one"))))]
    )
    assert single.returncode == 0, single.stderr[-4000:]
    parallel = [h for h in trainer_log_history(tmp_path / "out") if "loss" in h]
    one = [h for h in trainer_log_history(tmp_path / "one") if "loss" in h]
    assert len(parallel) == len(one) == 4
    assert [h["loss"] for h in parallel] == pytest.approx([h["loss"] for h in one], rel=1e-5, abs=0)
    assert [h["grad_norm"] for h in parallel] == pytest.approx([h["grad_norm"] for h in one], rel=1e-4, abs=0)
