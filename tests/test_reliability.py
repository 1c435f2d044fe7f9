"""Mistakes users make, each found by trying it: inputs read the way users write them, keys that take effect or are
refused, runs that never waste a step, output folders that are never mixed. See docs/reliability.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_longlora import cli
from hf_longlora.training import pretraining
from hf_longlora.training.schedule import warmup_factor


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def parse(command: str, tmp_path: Path, config: dict, *flags: str):
    argv = ["--config", str(write_yaml(tmp_path / "c.yaml", config)), *flags]
    *parsed, config_rest, cli_rest = cli.training_parser(
        command, cli._explicit_keys(argv)
    ).parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)
    assert config_rest == [] and cli_rest == []
    return parsed


def train_config(tmp_path, checkpoint, corpus, **overrides) -> dict:
    config = {
        "model_name_or_path": str(checkpoint),
        "corpus": [str(corpus)],
        "context_length": 128,
        "max_steps": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.002,
        "save_steps": 100,
        "output_dir": str(tmp_path / "out"),
        "dtype": "float32",
    }
    config.update(overrides)
    return config


def run_train(tmp_path, config, capsys, *flags) -> tuple[int, str, str]:
    code = cli.main(["train", "--config", str(write_yaml(tmp_path / "train.yaml", config)), *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------ a single value where a list goes


def test_single_values_where_lists_are_expected(tmp_path):
    """`corpus: stdlib`, `corpus: /data/`, `data_files: x.jsonl`, `passkey_lengths: 1024` are one-item lists (they
    used to be read one character at a time: `corpus: /x/` walked the filesystem from `/`)."""
    _, corpus_args, longlora_args, _ = parse(
        "train",
        tmp_path,
        {"model_name_or_path": "m", "corpus": "stdlib", "long_eval_lengths": 1024, "passkey_lengths": 512},
    )
    assert corpus_args.corpus == ["stdlib"]
    assert longlora_args.long_eval_lengths == [1024] and longlora_args.passkey_lengths == [512]
    _, corpus_args, _, _ = parse("train", tmp_path, {"model_name_or_path": "m", "corpus": "/data/"})
    assert corpus_args.corpus == ["/data/"]
    parsed = parse(
        "sft", tmp_path, {"model_name_or_path": "m", "data_files": "x.jsonl", "long_eval_corpus": "stdlib"}
    )
    assert parsed[5].data_files == ["x.jsonl"] and parsed[4].long_eval_corpus == ["stdlib"]
    # lists stay lists
    _, corpus_args, _, _ = parse("train", tmp_path, {"model_name_or_path": "m", "corpus": ["a", "b"]})
    assert corpus_args.corpus == ["a", "b"]


@pytest.mark.slow
def test_a_single_corpus_directory_trains(tmp_path, tiny_checkpoint, corpus, capsys):
    config = train_config(tmp_path, tiny_checkpoint, corpus) | {"corpus": str(corpus)}  # a string, not a list
    code, out, err = run_train(tmp_path, config, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["training_data"] == [
        str(corpus)
    ]


# ------------------------------------------------------------------------- keys take effect or are refused


def test_every_model_and_script_key_is_applied_or_refused():
    """Each key of TRL's ModelConfig / ScriptArguments / DatasetMixtureConfig (shown in --help) is either read by
    hf-longlora or in the refused table: a new TRL key fails this test until someone decides."""
    import dataclasses

    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from hf_longlora.training.checks import UNSUPPORTED_KEYS

    applied = {
        "model_name_or_path", "model_revision", "dtype", "attn_implementation", "lora_r", "lora_alpha",
        "lora_dropout", "lora_target_modules", "lora_target_parameters", "lora_modules_to_save", "lora_task_type",
        "use_rslora", "use_dora", "load_in_4bit", "bnb_4bit_quant_storage", "dataset_name", "dataset_config",
        "dataset_train_split", "datasets",
    }  # fmt: skip
    keys = {
        f.name for c in (ModelConfig, ScriptArguments, DatasetMixtureConfig) for f in dataclasses.fields(c)
    }
    assert keys - applied - set(UNSUPPORTED_KEYS) == set()
    assert applied & set(UNSUPPORTED_KEYS) == set()


def test_lora_variants_take_effect(tmp_path):
    from hf_longlora.training import longlora_config_from

    model_args, _, longlora_args, _ = parse(
        "train",
        tmp_path,
        {"model_name_or_path": "m", "use_dora": True, "use_rslora": True, "lora_task_type": "CAUSAL_LM"},
    )
    config = longlora_config_from(model_args, longlora_args)
    assert config.use_dora is True and config.use_rslora is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"load_in_8bit": True},
            "load_in_8bit=True is not supported: 8-bit bases are not supported; use load_in_4bit",
        ),
        ({"use_peft": False}, "use_peft=False is not supported: LongLoRA always trains a PEFT adapter"),
        ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type='fp4' is not supported"),
        ({"use_bnb_nested_quant": False}, "use_bnb_nested_quant=False is not supported"),
        ({"max_steps": -5}, "max_steps must be >= 1, got -5"),
        ({"max_steps": 0}, "max_steps must be >= 1, got 0"),
        ({"max_steps": -1}, "to train by epochs set num_train_epochs with max_steps: -1"),
    ],
)
def test_train_refuses_keys_it_would_ignore(
    tmp_path, tiny_checkpoint, corpus, capsys, no_loading, extra, message
):
    code, _, err = run_train(tmp_path, train_config(tmp_path, tiny_checkpoint, corpus, **extra), capsys)
    assert code == 2 and message in err, err


def test_sft_refuses_keys_it_would_ignore(tmp_path, tiny_checkpoint, capsys, no_loading):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    base = {
        "model_name_or_path": str(tiny_checkpoint),
        "data_files": str(data),
        "output_dir": str(tmp_path / "o"),
    }
    for extra, message in (
        ({"dataset_streaming": True}, "dataset_streaming=True is not supported"),
        ({"dataset_test_split": "validation"}, "dataset_test_split='validation' is not supported"),
        ({"load_in_8bit": True}, "load_in_8bit=True is not supported"),
    ):
        code = cli.main(["sft", "--config", str(write_yaml(tmp_path / "s.yaml", base | extra))])
        assert code == 2 and message in capsys.readouterr().err, extra


def test_max_steps_minus_one_means_epochs_when_epochs_are_set(tmp_path):
    from hf_longlora.training.checks import check_steps

    *_, training_args = parse(
        "train", tmp_path, {"model_name_or_path": "m", "max_steps": -1, "num_train_epochs": 2}
    )
    check_steps(training_args, {"max_steps", "num_train_epochs"})  # accepted
    check_steps(training_args, None)  # the Python API: transformers' convention
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        check_steps(training_args, {"max_steps"})


# --------------------------------------------------------------------------------- every step learns


def test_warmup_never_has_a_step_at_learning_rate_zero():
    assert [round(warmup_factor(s, 3), 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(0, 1) == 0.5 and warmup_factor(1, 1) == 1.0
    assert all(warmup_factor(0, w) > 0 for w in range(1, 50))


@pytest.mark.slow
def test_one_step_run_trains(tmp_path, tiny_checkpoint, corpus, capsys):
    """A 1-step run (recipe warmup scaled to 1 step) has a non-zero learning rate and saves a trained adapter
    (LoRA's B starts at zero, so an untouched adapter has every lora_B == 0)."""
    config = train_config(tmp_path, tiny_checkpoint, corpus, max_steps=1, save_steps=1)
    code, out, err = run_train(tmp_path, config, capsys)
    assert code == 0, err
    assert "'warmup_steps': 1" in out
    state = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())
    step = [h for h in state["log_history"] if "loss" in h][0]
    assert step["learning_rate"] == pytest.approx(0.002 * 0.5)
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)


# ------------------------------------------------------------------------ one run per output folder


@pytest.mark.slow
def test_output_dir_with_another_runs_checkpoints(tmp_path, tiny_checkpoint, corpus, capsys, monkeypatch):
    """A second run into the same output_dir is refused (before loading), unless it resumes or overwrites."""
    config = train_config(tmp_path, tiny_checkpoint, corpus, max_steps=2, save_steps=1)
    assert run_train(tmp_path, config, capsys)[0] == 0
    out = tmp_path / "out"
    first = (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    # refused, nothing touched, model never loaded
    with monkeypatch.context() as m:
        m.setattr(
            pretraining, "load_for_training", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded"))
        )
        code, _, err = run_train(tmp_path, config | {"learning_rate": 0.01}, capsys)
    assert code == 2 and "holds another run's checkpoints (checkpoint-1, checkpoint-2)" in err
    assert "resume_from_checkpoint: true" in err and "overwrite_output_dir: true" in err
    assert (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == first
    # resuming continues the run: 2 more steps after checkpoint-2
    code, _, err = run_train(tmp_path, config | {"max_steps": 4, "resume_from_checkpoint": True}, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (1, 2, 3, 4)]
    # overwriting deletes the old checkpoints and starts again
    code, _, err = run_train(tmp_path, config | {"max_steps": 1, "overwrite_output_dir": True}, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["max_steps"] == 1


# ------------------------------------------------------------------------------- one spelling for everything


def test_flags_accept_dashes_and_underscores_everywhere(tmp_path):
    assert cli.dashed_flags(["eval", "--max_windows", "2", "--context_length=5", "x_y", "--", "--a_b"]) == [
        "eval", "--max-windows", "2", "--context-length=5", "x_y", "--", "--a_b"
    ]  # fmt: skip
    args = cli.build_parser().parse_args(
        cli.dashed_flags(["eval", "--model", "m", "--data", "stdlib", "--lengths", "64", "--max_windows", "3",
                          "--passkey_lengths", "128", "--no_progress"])
    )  # fmt: skip
    assert args.max_windows == 3 and args.passkey_lengths == [128] and args.no_progress
    for flag in ("--warmup_steps", "--warmup-steps"):
        *_, training_args = parse("train", tmp_path, {"model_name_or_path": "m"}, flag, "3")
        assert training_args.warmup_steps == 3
        assert "warmup_steps" in cli._explicit_keys([flag, "3"])  # counts as the user's, for the recipe


def test_dtype_names_are_the_same_in_every_subcommand(tmp_path, capsys):
    from hf_longlora.adapters.loading import DTYPE_NAMES, parse_dtype

    assert set(cli.DTYPE_CHOICES) == set(DTYPE_NAMES)
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32 and parse_dtype("auto") == "auto"
    with pytest.raises(ValueError, match=r"dtype='bf61' is not a dtype; use one of \['bf16', 'bfloat16'"):
        parse_dtype("bf61")
    for name in ("bf16", "bfloat16"):
        assert cli.build_parser().parse_args(
            ["merge", "--base", "b", "--adapter", "a", "--out", "o", "--dtype", name]
        )
        model_args, *_ = parse("train", tmp_path, {"model_name_or_path": "m", "dtype": name})
        assert parse_dtype(model_args.dtype) is torch.bfloat16
        model_args, *_ = parse("train", tmp_path, {"model_name_or_path": "m"}, "--dtype", name)
        assert parse_dtype(model_args.dtype) is torch.bfloat16


def test_bad_dtype_in_a_config_fails_before_loading(tmp_path, tiny_checkpoint, corpus, capsys, no_loading):
    code, _, err = run_train(tmp_path, train_config(tmp_path, tiny_checkpoint, corpus, dtype="bf61"), capsys)
    assert code == 2 and "dtype='bf61' is not a dtype" in err


def test_version(capsys):
    import hf_longlora

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert (
        exit_.value.code == 0 and capsys.readouterr().out.strip() == f"hf-longlora {hf_longlora.__version__}"
    )


# ------------------------------------------------------------------------ activation checkpointing everywhere


def test_load_model_checkpoints_activations_of_every_model(tmp_path, tiny_checkpoint):
    """activation_checkpointing=True (the default) turns checkpointing on without 4-bit too (it used to act only
    through prepare_model_for_kbit_training); a training step still reaches the adapter."""
    from hf_longlora import LongLoraConfig, get_longlora_model, load_model
    from hf_longlora.attention.backend import ATTENTION_CALLS

    model = load_model(str(tiny_checkpoint), context_length=128, dtype=torch.float32)
    assert model.is_activation_checkpointing
    assert not load_model(str(tiny_checkpoint), activation_checkpointing=False).is_activation_checkpointing
    peft_model = get_longlora_model(model, LongLoraConfig()).train()
    ids = torch.randint(0, 100, (1, 64))
    before = ATTENTION_CALLS["s2"]
    peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    layers = model.config.num_hidden_layers
    assert ATTENTION_CALLS["s2"] - before == 2 * layers  # each layer's forward, and again in the backward
    lora_b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.grad is not None and lora_b.grad.abs().max() > 0


# ----------------------------------------------------------------------------- clear errors, never tracebacks


def test_missing_model_path_and_tokenizer(tmp_path, tiny_checkpoint, corpus, capsys, no_loading):
    config = train_config(tmp_path, tiny_checkpoint, corpus, model_name_or_path=str(tmp_path / "nope"))
    code, _, err = run_train(tmp_path, config, capsys)
    assert code == 2 and f"model_name_or_path={str(tmp_path / 'nope')!r}: no config.json there" in err
    assert "Traceback" not in err
    no_tokenizer = tmp_path / "no_tok"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    code, _, err = run_train(tmp_path, config | {"model_name_or_path": str(no_tokenizer)}, capsys)
    assert code == 2 and "has no usable tokenizer" in err and "tokenizer.save_pretrained" in err


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\ncontext_length: 1024\n  max_steps: [3\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--config {bad}: YAML syntax error at line 3" in err and len(err.splitlines()) == 1
    assert cli.main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_a_bad_value_is_one_short_line_naming_the_key(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", {"model_name_or_path": "m", "context_length": "abc"})
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "hf-longlora train: error: context_length: invalid int value: 'abc' (`hf-longlora train --help` lists the keys)"
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "q"}, "SFT record 1: 'output' is missing"),
        ({"instruction": "q", "output": 42}, "SFT record 1: 'output' is a int, not a string"),
        ({"instruction": ["q"], "output": "a"}, "SFT record 1: 'instruction' is a list, not a string"),
        ({"instruction": "q", "output": "a", "input": 3}, "SFT record 1: 'input' is a int, not a string"),
    ],
)
def test_sft_records_are_checked_before_loading(
    tmp_path, tiny_checkpoint, capsys, no_loading, record, message
):
    data = tmp_path / "d.jsonl"
    good = {"instruction": "q", "output": "a", "input": ""}
    data.write_text("".join(json.dumps(r) + "\n" for r in (good, record)))
    config = {
        "model_name_or_path": str(tiny_checkpoint),
        "data_files": str(data),
        "output_dir": str(tmp_path / "o"),
        "max_length": 64,
    }
    assert cli.main(["sft", "--config", str(write_yaml(tmp_path / "s.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert message in err and '{"instruction": str, "output": str' in err and "Traceback" not in err


def test_max_length_above_the_context_says_how_to_extend(tmp_path, tiny_checkpoint, capsys, no_loading):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    config = {"model_name_or_path": str(tiny_checkpoint), "data_files": str(data), "max_length": 256,
              "output_dir": str(tmp_path / "o")}  # fmt: skip
    assert cli.main(["sft", "--config", str(write_yaml(tmp_path / "s.yaml", config))]) == 2
    assert "set context_length: 256 to extend it with position interpolation" in capsys.readouterr().err


def test_data_out_is_checked_before_the_work(tmp_path, capsys, monkeypatch):
    from hf_longlora.data import longalpaca_sample

    monkeypatch.setattr(
        longalpaca_sample,
        "build_longalpaca_sample",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")),
    )
    assert cli.main(["data", "longalpaca-sample", "--out", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    existing = tmp_path / "x.jsonl"
    existing.write_text("precious\n")
    assert cli.main(["data", "longalpaca-sample", "--out", str(existing)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and existing.read_text() == "precious\n"


def test_data_errors_name_the_flags(tmp_path, capsys):
    out = str(tmp_path / "s.jsonl")
    assert cli.main(["data", "longalpaca-sample", "--out", out, "--records", "0"]) == 2
    assert "--records must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["data", "longalpaca-sample", "--out", out, "--length", "10"]) == 2
    assert "--length must be >= 200" in capsys.readouterr().err


def test_eval_out_is_not_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    argv = ["eval", "--model", "m", "--data", "stdlib", "--lengths", "64", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "holds earlier results (eval.json); pass --overwrite" in capsys.readouterr().err
    assert (out / "eval.json").read_text() == "{}"


def test_push_without_network_token_or_hub_access(tmp_path, monkeypatch, capsys):
    """huggingface_hub's errors become one line that says what to do (intercepted at HfApi's boundary)."""
    from huggingface_hub import HfApi, errors

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "b"})
    )
    argv = ["push", "--adapter", str(adapter), "--repo-id", "me/x"]
    for raised, message in (
        (errors.LocalTokenNotFoundError("no token"), "no Hub token: run `hf auth login`, set HF_TOKEN"),
        (
            errors.HTTPError("[Errno -3] Temporary failure in name resolution"),
            "cannot reach the Hub (HTTPError",
        ),
        (errors.OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE=1"),
    ):
        monkeypatch.setattr(HfApi, "create_repo", lambda *a, _e=raised, **k: (_ for _ in ()).throw(_e))
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "nothing was uploaded" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_push_offline_for_real(tmp_path):
    """With HF_HUB_OFFLINE=1 huggingface_hub itself refuses: a subprocess, nothing intercepted."""
    import os
    import subprocess
    import sys

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "b"})
    )
    result = subprocess.run(
        [sys.executable, "-m", "hf_longlora.cli", "push", "--adapter", str(adapter), "--repo-id", "me/x"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2 and "HF_HUB_OFFLINE=1" in result.stderr and "Traceback" not in result.stderr
