"""The launch scripts and example configs in examples/: the CPU pipeline runs end to end, the GPU recipes parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hf_longlora.adapters.context import extend_context
from hf_longlora.cli import _explicit_keys, training_parser
from hf_longlora.training import check_context_extension, scale_recipe

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "examples" / "configs"
GPU_RECIPES = {
    # config: (command, context, rope factor, S2 group size after scaling, 4-bit)
    "llama2_7b_100k_pretrain.yaml": ("train", 100_000, 25.0, None, False),
    "llama2_7b_longalpaca_sft.yaml": ("sft", 32_768, 8.0, 8192, False),
    "llama2_7b_qlora_sft_1gpu.yaml": ("sft", 16_384, 4.0, 4096, True),
    "llama2_7b_512k_ulysses_pretrain.yaml": ("train", 524_288, 128.0, None, False),
}


def parse(command: str, config: Path, *flags: str):
    *parsed, config_rest, cli_rest = training_parser(command).parse_args_and_config(
        ["--config", str(config), *flags], return_remaining_strings=True, separate_remaining_strings=True
    )
    assert config_rest == [] and cli_rest == [], (config.name, config_rest, cli_rest)
    return parsed


def test_every_example_config_parses():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert set(GPU_RECIPES) < set(names) and {"pretrain_tiny_cpu.yaml", "sft_tiny_cpu.yaml"} < set(names)
    for name in names:
        parse("train" if "pretrain" in name else "sft", CONFIGS / name)


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_gpu_recipes_parse_and_scale(tmp_path, name, monkeypatch):
    """The GPU recipes go through TRL's parser and the pre-load checks against a Llama-2-7B-shaped config (no
    weights: the model load is what is skipped)."""
    from transformers import LlamaConfig

    command, context, factor, group, four_bit = GPU_RECIPES[name]
    base = tmp_path / "llama-2-7b-config"
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                max_position_embeddings=4096, vocab_size=32000).save_pretrained(base)  # fmt: skip
    parsed = parse(command, CONFIGS / name, "--model_name_or_path", str(base))
    if command == "train":
        model_args, corpus_args, longlora_args, training_args = parsed
        assert corpus_args.dataset_name == "togethercomputer/RedPajama-Data-1T-Sample"
    else:
        script_args, training_args, model_args, _, longlora_args, data_args = parsed
        assert script_args.dataset_name == "Yukang/LongAlpaca-12k" and training_args.max_length == context
    assert model_args.load_in_4bit == four_bit
    # the recipe's defaults: 1000 steps, batch 1 x accumulation 8, lr 2e-5, 20 warmup steps
    assert (training_args.max_steps, training_args.per_device_train_batch_size) == (1000, 1)
    assert training_args.gradient_accumulation_steps == 8 and training_args.adam_beta2 == 0.95
    target = check_context_extension(str(base), longlora_args)
    assert target == context
    extended = LlamaConfig.from_pretrained(base)
    extend_context(extended, target, longlora_args.rope_method)
    assert extended.rope_parameters["factor"] == factor
    explicit = _explicit_keys(["--config", str(CONFIGS / name)])
    scale_recipe(command, explicit, model_args, longlora_args, training_args, target)
    assert longlora_args.s2_group_size == group and longlora_args.s2_group_size_ratio == 0.25
    assert (training_args.learning_rate, training_args.warmup_steps) == (2e-5, 20)
    if "ulysses" in name:  # 8 processes with 4 of the 32 heads each
        from hf_longlora.training.sequence_parallel import check_sequence_parallel_launch

        assert longlora_args.sequence_parallel_size == 8
        monkeypatch.setenv("WORLD_SIZE", "8")
        check_sequence_parallel_launch(8, LlamaConfig.from_pretrained(base))
        monkeypatch.setenv("WORLD_SIZE", "4")
        with pytest.raises(ValueError, match="needs a multiple of 8 processes, got 4"):
            check_sequence_parallel_launch(8, LlamaConfig.from_pretrained(base))


def trainer_log_history(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


@pytest.mark.slow
def test_cpu_pipeline_launch_scripts(tmp_path):
    """examples/launch/cpu_tiny.sh: tiny base -> pretrain.sh (accelerate) -> merge -> the offline LongAlpaca sample
    -> sft.sh (accelerate, QLoRA) with the long-context evaluation callback, as a user runs it."""
    out = tmp_path / "run"
    venv_bin = str(Path(sys.executable).parent)
    env = os.environ | {"PATH": venv_bin + os.pathsep + os.environ["PATH"], "PYTHON": sys.executable}
    env |= {"OUT": str(out), "QLORA": "1"}
    result = subprocess.run(
        # flags after the script go to both stages: 4 steps each, evaluations at steps 2 and 4
        [str(ROOT / "examples" / "launch" / "cpu_tiny.sh"), "--max_steps", "4", "--save_steps", "4"]
        + ["--long_eval_steps", "2"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    # stage 1: 4x context with the callbacks' metrics
    pretrain = json.loads((out / "pretrain" / "adapter_config.json").read_text())
    assert pretrain["context_length"] == 1024 and pretrain["rope_parameters"]["factor"] == 4.0
    evals = [h for h in trainer_log_history(out / "pretrain" / "checkpoint-4") if "eval_ppl_1024" in h]
    assert [h["step"] for h in evals] == [2, 4] and all("eval_passkey_512" in h for h in evals)
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["max_position_embeddings"] == 1024 and merged["rope_parameters"]["factor"] == 4.0
    # the offline sample, measured in the model's tokens, fits max_length: nothing dropped
    records = [json.loads(line) for line in (out / "longalpaca-sample.jsonl").read_text().splitlines()]
    assert Counter(r["source"] for r in records) == {"hotpotqa": 9, "squad": 9, "passkey": 6}
    assert "hf-longlora sft: 24 records; over max_length=1024: 0 dropped, 0 truncated" in result.stdout
    # stage 2: QLoRA on the merged model, the recipe's group scaled to 1024 // 4, evaluation inside SFTTrainer
    assert "base loaded in NF4 (bitsandbytes): 14 Linear4bit layers" in result.stdout
    assert (
        "recipe defaults scaled to the model and run: {'s2_group_size': 256, 'warmup_steps': 1}"
        in result.stdout
    )
    sft = json.loads((out / "sft" / "adapter_config.json").read_text())
    assert sft["s2_attention"]["group_size"] == 256 and sft["training_data"] == [
        str(out / "longalpaca-sample.jsonl")
    ]
    history = trainer_log_history(out / "sft" / "checkpoint-4")
    assert [h["step"] for h in history if "eval_ppl_1024" in h] == [2, 4]
    assert all(0 <= h["eval_passkey_512"] <= 1 for h in history if "eval_ppl_1024" in h)
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]


def test_launch_script_usage_error():
    result = subprocess.run([str(ROOT / "examples" / "launch" / "sft.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_accelerate_configs_load():
    """Every accelerate config loads with accelerate's own reader; DeepSpeed JSON files exist and set ZeRO stages.
    (The two CPU ones also run for real in test_training.py; the GPU ones cannot run here.)"""
    from accelerate.commands.config.config_args import load_config_from_file

    stages = {}
    for path in sorted((ROOT / "examples" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        if config.distributed_type.value == "DEEPSPEED":
            ds = json.loads((ROOT / config.deepspeed_config["deepspeed_config_file"]).read_text())
            stages[path.name] = ds["zero_optimization"]["stage"]
    assert stages == {
        "deepspeed_zero2.yaml": 2,
        "deepspeed_zero2_cpu_2proc.yaml": 2,
        "deepspeed_zero3_offload.yaml": 3,
        "deepspeed_zero3_ulysses.yaml": 3,
    }
