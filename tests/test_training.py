"""Training entry points: continued pretraining and LongAlpaca SFT through the CLI, callbacks, bad configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_longlora import cli
from hf_longlora.data import pack_documents

ROOT = Path(__file__).resolve().parent.parent


def longalpaca_records(n: int = 12, long_every: int = 0) -> list[dict]:
    """LongAlpaca-format records built from offline text: a passage, a question about it, the answer."""
    from hf_longlora.data import pydoc_topics_text

    text = pydoc_topics_text()
    records = []
    for i in range(n):
        passage = text[2000 + 900 * i : 2000 + 900 * i + 250]
        key = 1000 + 37 * i
        size = 20 if long_every and i % long_every == 0 else 1
        records.append(
            {
                "instruction": "Read the passage and answer: what is the code mentioned in it?",
                "input": (passage + f" The code is {key}. ") * size,
                "output": f"The code is {key}.",
            }
        )
    return records


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(args, timeout=900, env=None):
    """`python -m hf_longlora.cli ARGS` in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "hf_longlora.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    return result


def tiny_run(tmp_path: Path, checkpoint, **overrides) -> dict:
    """Trainer settings shared by the `train` and `sft` configs here: 256 tokens (4x the checkpoint's 64), fp32 on CPU,
    3 steps without accumulation, one checkpoint at the end."""
    config = {
        "model_name_or_path": str(checkpoint),
        "context_length": 256,
        "max_steps": 3,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.002,
        "warmup_steps": 1,
        "save_steps": 3,
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "dtype": "float32",
    }
    config.update(overrides)
    return config


def train_config(tmp_path: Path, checkpoint, corpus, **overrides) -> dict:
    """A tiny `hf-longlora train` config on the test corpus."""
    return tiny_run(tmp_path, checkpoint, corpus=[str(corpus)], **overrides)


def trainer_log_history(output_dir: Path) -> list[dict]:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, f"no checkpoint in {output_dir}"
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]


# --------------------------------------------------------------------------------------------------- packing


def test_pack_documents_joins_with_eos_and_restarts_positions():
    blocks = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, eos_token_id=0, document_boundaries=True)
    # stream: 1 2 3 0 | 4 5 0 6 | 7 8 9 0
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert len(pack_documents([[1, 2, 3]], 3, 0)) == 1  # 1 2 3 | 0 (partial, dropped)
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        pack_documents([[1]], 1, 0)


# ---------------------------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"contxt_length": 256}, "unknown keys \\['contxt_length'\\]"),
        ({"context_length": 32}, "shorter than the model's current context of 64"),
        ({"rope_method": "ntk"}, "rope_method must be one of"),
        ({"s2_group_size_ratio": 2.0}, "s2_group_size_ratio must be a float in"),
        ({"rope_options": {"beta_fast": 4}}, "\\['beta_fast'\\] not allowed with rope_method='linear'"),
        ({"rope_method": "yarn", "rope_options": "{beta_fast: 4}"}, "rope_options must be a JSON object"),
        (
            {"rope_method": "yarn", "context_length": 256, "rope_options": {"beta_fast": 0}},
            "rope_options\\['beta_fast'\\] must be a positive number",
        ),
    ],
)
def test_train_bad_config_fails_before_loading(
    tmp_path, tiny_checkpoint, corpus, extra, message, capsys, no_loading
):
    config = {
        "model_name_or_path": str(tiny_checkpoint),
        "corpus": [str(corpus)],
        "output_dir": str(tmp_path / "o"),
    }
    config.update(extra)
    code = cli.main(["train", "--config", str(write_yaml(tmp_path / "c.yaml", config))])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and __import__("re").search(message, err), err
    assert not (tmp_path / "o").exists()


def test_sft_bad_data_fails_before_loading(tmp_path, tiny_checkpoint, capsys, no_loading):
    def run(records, **extra):
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        config = {
            "model_name_or_path": str(tiny_checkpoint),
            "data_files": [str(data)],
            "output_dir": str(tmp_path / "o"),
            "max_length": 256,
            "context_length": 256,
            **extra,
        }
        return cli.main(
            ["sft", "--config", str(write_yaml(tmp_path / "c.yaml", config))]
        ), capsys.readouterr().err

    code, err = run([{"question": "q", "answer": "a"}])
    assert code == 2 and "the SFT dataset has no 'instruction' field" in err
    code, err = run([{"instruction": "q", "output": "a"}], max_length=512)
    assert (
        code == 2
        and "max_length=512 exceeds the model's context of 256 tokens: set context_length: 512" in err
    )
    code, err = run([{"instruction": "q", "output": "a"}], data_files=[str(tmp_path / "missing.jsonl")])
    assert code == 2 and "data_files not found" in err
    code, err = run(longalpaca_records(3, long_every=1))
    assert code == 2 and "every SFT record is longer than max_length=256" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ end-to-end runs


@pytest.mark.slow
def test_continued_pretraining_cli_with_callbacks(tmp_path, tiny_checkpoint, corpus):
    config = train_config(
        tmp_path,
        tiny_checkpoint,
        corpus,
        document_boundaries=True,
        eval_documents=1,
        long_eval_lengths=[64, 256],
        passkey_lengths=[200],
        long_eval_steps=2,
        max_steps=4,
        save_steps=2,
    )
    result = run_cli(["train", "--config", str(write_yaml(tmp_path / "train.yaml", config))])
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["context_length"] == 256 and adapter_config["rope_parameters"]["factor"] == 4.0
    assert adapter_config["training_data"] == [str(corpus)]
    history = trainer_log_history(out)
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 4
    assert all(h["step_tokens_per_second"] > 0 and h["peak_memory_gb"] > 0 for h in steps)
    # 2 layers, each run in the forward and again in the activation-checkpointing recomputation
    assert steps[0]["s2_attention_calls_train"] == 4 and steps[0]["full_attention_calls_train"] == 0
    evals = [h for h in history if "eval_ppl_256" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all(h["eval_ppl_64"] > 1 and 0 <= h["eval_passkey_200"] <= 1 for h in evals)


@pytest.mark.slow
@pytest.mark.parametrize("four_bit", [False, True], ids=["bf16-free", "nf4"])
def test_sft_cli_longalpaca(tmp_path, tiny_checkpoint, corpus, four_bit):
    """SFT through the CLI, in fp32 and on an NF4 base, with the long-context evaluation callback inside
    TRL's SFTTrainer (held-out documents from long_eval_corpus)."""
    data = tmp_path / "longalpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in longalpaca_records(12, long_every=4)))
    config = tiny_run(tmp_path, tiny_checkpoint) | {
        "data_files": [str(data)],
        "max_length": 256,
        "s2_group_size": 64,
        "per_device_train_batch_size": 2,
        "load_in_4bit": four_bit,
        "long_eval_corpus": [str(corpus)],
        "long_eval_lengths": [256],
        "passkey_lengths": [128],
        "long_eval_steps": 2,
    }
    result = run_cli(["sft", "--config", str(write_yaml(tmp_path / "sft.yaml", config))])
    assert result.returncode == 0, result.stderr[-4000:]
    # 2 layers x q/k/v/o/gate/up/down quantized (the tiny model's lm_head is not)
    assert (
        "hf-longlora: base loaded in NF4 (bitsandbytes): 14 Linear4bit layers" in result.stdout
    ) == four_bit
    # 3 of 12 records are ~40x longer than the rest: dropped and counted, never silently cut
    assert "12 records; over max_length=256: 3 dropped, 0 truncated (overlong_policy=drop)" in result.stdout
    out = tmp_path / "out"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["s2_attention"]["group_size"] == 64 and adapter_config["context_length"] == 256
    history = trainer_log_history(out)
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 3 and all(h["loss"] == h["loss"] for h in steps)
    assert steps[0]["s2_attention_calls_train"] > 0 and steps[0]["full_attention_calls_train"] == 0
    assert all(h["step_tokens_per_second"] > 0 and h["peak_memory_gb"] > 0 for h in steps)
    evals = [h for h in history if "eval_ppl_256" in h]
    assert [h["step"] for h in evals] == [2, 3]  # every 2 steps and at the end
    assert all(1 < h["eval_ppl_256"] < 1e6 and 0 <= h["eval_passkey_128"] <= 1 for h in evals)


@pytest.mark.slow
def test_train_cli_nf4(tmp_path, tiny_checkpoint, corpus):
    """`hf-longlora train` on an NF4 base (bitsandbytes on CPU, optim adamw_torch): trains and saves the adapter."""
    config = train_config(tmp_path, tiny_checkpoint, corpus, load_in_4bit=True, optim="adamw_torch")
    result = run_cli(["train", "--config", str(write_yaml(tmp_path / "train.yaml", config))])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "hf-longlora: base loaded in NF4 (bitsandbytes): 14 Linear4bit layers" in result.stdout
    steps = [h for h in trainer_log_history(tmp_path / "out") if "loss" in h]
    assert len(steps) == 3 and all(0 < h["loss"] < 100 for h in steps)
    assert steps[0]["s2_attention_calls_train"] > 0
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["context_length"] == 256


# ------------------------------------------------------------------------------------------------ trl hook


def test_trl_hook_registers_only_when_asked(tmp_path):
    from hf_longlora.training import trl_hook

    assert cli.main(["trl-hook", "install", "--site-dir", str(tmp_path)]) == 0
    assert trl_hook.is_installed(tmp_path)
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); from transformers import AttentionInterface; "
        "print('s2_attention' in AttentionInterface._global_mapping, 'hf_longlora' in sys.modules)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != trl_hook.ENV_VAR}
    off = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    on = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**env, trl_hook.ENV_VAR: "1"},
    )
    assert off.stdout.split() == ["False", "False"], off.stderr[-2000:]
    assert on.stdout.split() == ["True", "True"], on.stderr[-2000:]
    assert cli.main(["trl-hook", "remove", "--site-dir", str(tmp_path)]) == 0
    assert not trl_hook.is_installed(tmp_path)


@pytest.fixture
def trl_hook_in_this_environment():
    """The hook in the venv's own site-packages (as a user installs it); removed afterwards if we added it."""
    from hf_longlora.training import trl_hook

    was_installed = trl_hook.is_installed()
    trl_hook.install()
    yield
    if not was_installed:
        trl_hook.remove()


@pytest.mark.slow
def test_plain_trl_sft_with_s2_attention(tmp_path, tiny_checkpoint, trl_hook_in_this_environment):
    """`trl sft --config x.yaml` (TRL's own script in an accelerate child process) trains with s2_attention."""
    data = tmp_path / "pc.jsonl"
    records = longalpaca_records(6)
    data.write_text(
        "".join(json.dumps({"prompt": f"[INST] {r['input']} [/INST]", "completion": " " + r["output"]}) + "\n"
                for r in records)
    )  # fmt: skip
    config = {
        "env": {"HF_LONGLORA_REGISTER": "1"},
        "model_name_or_path": str(tiny_checkpoint),
        "attn_implementation": "s2_attention",
        "model_init_kwargs": {"s2_group_size": 16},
        "datasets": [{"path": "json", "data_files": str(data)}],
        "max_length": 256,
        "max_steps": 2,
        "per_device_train_batch_size": 1,
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
    }
    trl = Path(sys.executable).parent / "trl"
    # an observer in every Python process the command starts: at exit it writes the process's attention-call
    # counters (hf_longlora.attention.backend.ATTENTION_CALLS, None where hf_longlora was never imported)
    reports = tmp_path / "calls"
    reports.mkdir()
    (tmp_path / "observer").mkdir()
    (tmp_path / "observer" / "sitecustomize.py").write_text(
        "import atexit, json, os, sys\n"
        "def _report():\n"
        "    backend = sys.modules.get('hf_longlora.attention.backend')\n"
        "    calls = dict(backend.ATTENTION_CALLS) if backend is not None else None\n"
        f"    path = os.path.join({str(reports)!r}, f'{{os.getpid()}}.json')\n"
        "    with open(path, 'w') as f:\n"
        "        json.dump({'pid': os.getpid(), 'ppid': os.getppid(), 'calls': calls}, f)\n"
        "atexit.register(_report)\n"
    )
    env = dict(__import__("os").environ)
    env["PYTHONPATH"] = str(tmp_path / "observer") + (
        ":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    process = subprocess.Popen(
        [str(trl), "sft", "--config", str(write_yaml(tmp_path / "trl.yaml", config))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["s2_group_size"] == 16
    assert "Training completed" in stdout + stderr
    # S2-Attn ran in the child that trained (not in `trl` itself): every layer of every step, at least once
    seen = {r["pid"]: r for r in (json.loads(p.read_text()) for p in reports.glob("*.json"))}
    trainers = [r for r in seen.values() if r["pid"] != process.pid and r["calls"] and r["calls"]["s2"] > 0]
    assert len(trainers) == 1, seen
    layers = json.loads((tiny_checkpoint / "config.json").read_text())["num_hidden_layers"]
    assert trainers[0]["calls"]["s2"] >= config["max_steps"] * layers, trainers
    assert all(r["calls"] is None or r["calls"]["s2"] == 0 for r in seen.values() if r not in trainers), seen
    # without the opt-in the child does not know the backend: the hook is what made it work
    del config["env"], config["model_init_kwargs"]
    config["output_dir"] = str(tmp_path / "out2")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_LONGLORA_REGISTER"}
    refused = subprocess.run(
        [str(trl), "sft", "--config", str(write_yaml(tmp_path / "trl2.yaml", config))],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert refused.returncode != 0 and "s2_attention" in refused.stderr


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    """A fault injected into a real model's forward from the 3rd step on: training stops there, with a clear error,
    and no checkpoint of the broken state is written."""
    import torch
    from datasets import Dataset
    from helpers import tiny_config
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from hf_longlora import get_longlora_model
    from hf_longlora.training.callbacks import (
        NonFiniteLossError,
        StopOnNonFiniteLossCallback,
        add_longlora_callbacks,
    )

    torch.manual_seed(0)
    model = get_longlora_model(
        AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="s2_attention")
    )
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 3 else output

    model.get_input_embeddings().register_forward_hook(poison)
    ids = torch.randint(0, 128, (8, 64)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=1, logging_steps=1,
        save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        data_collator=default_data_collator,
    )
    add_longlora_callbacks(trainer, [StopOnNonFiniteLossCallback()])
    with pytest.raises(
        NonFiniteLossError,
        match=r"step 3: loss is nan\. Last good checkpoint: .*checkpoint-2\. Lower the learning rate",
    ):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# ------------------------------------------------------------------------------------------- multi-process


def accelerate_launch(config_file: Path, args: list[str], timeout: int = 900):
    accelerate = Path(sys.executable).parent / "accelerate"
    return subprocess.run(
        [str(accelerate), "launch", "--config_file", str(config_file), "-m", "hf_longlora.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def train_with_two_processes(tmp_path, accelerate_config: str, checkpoint, corpus) -> list[dict]:
    """`hf-longlora train` through accelerate with 2 CPU processes; checks both ranks trained, returns the steps."""
    config = write_yaml(tmp_path / "train.yaml", train_config(tmp_path, checkpoint, corpus))
    result = accelerate_launch(
        ROOT / "examples" / "accelerate" / accelerate_config, ["train", "--config", str(config)]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [h for h in trainer_log_history(tmp_path / "out") if "loss" in h]
    assert [h["num_input_tokens_seen"] for h in steps] == [512, 1024, 1536]  # 2 ranks x 1 block x 256 tokens
    return steps


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, tiny_checkpoint, corpus):
    """accelerate with 2 CPU processes (gloo): both ranks train, each step sees 2 blocks of 256 tokens, and the
    per-step losses and gradient norms are those of one process training on the same global batch of 2 blocks.

    The same batches: the sampler is seeded (accelerate's seedable sampler, seed 42 in both runs) and with one block
    per rank, rank r takes the blocks at places 2k + r of the shuffled order, which are the 2 blocks one process with
    a batch of 2 takes at step k. The same loss: every block has 255 labelled tokens, so the mean over the global
    batch (transformers' average_tokens_across_devices, the logged loss being the mean over ranks) is one number.
    Only the order of the sums differs: fp32 rounding."""
    steps = train_with_two_processes(tmp_path, "ddp_cpu_2proc.yaml", tiny_checkpoint, corpus)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    single_config = train_config(
        tmp_path, tiny_checkpoint, corpus, per_device_train_batch_size=2, output_dir=str(tmp_path / "single")
    )
    result = run_cli(["train", "--config", str(write_yaml(tmp_path / "single.yaml", single_config))])
    assert result.returncode == 0, result.stderr[-4000:]
    single = [h for h in trainer_log_history(tmp_path / "single") if "loss" in h]
    assert [h["num_input_tokens_seen"] for h in single] == [h["num_input_tokens_seen"] for h in steps]
    assert [h["loss"] for h in steps] == pytest.approx([h["loss"] for h in single], rel=1e-5, abs=0)
    assert [h["grad_norm"] for h in steps] == pytest.approx([h["grad_norm"] for h in single], rel=1e-5, abs=0)
    assert len({round(h["loss"], 3) for h in single}) == len(single)  # training moves: the steps differ


@pytest.mark.slow
def test_deepspeed_zero2_on_cpu(tmp_path, tiny_checkpoint, corpus):
    """DeepSpeed ZeRO-2 with 2 CPU processes: both ranks train and the optimizer state is partitioned 2 ways."""
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    train_with_two_processes(tmp_path, "deepspeed_zero2_cpu_2proc.yaml", tiny_checkpoint, corpus)
    shard = tmp_path / "out" / "checkpoint-3" / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
        state = torch.load(shard, weights_only=True, map_location="cpu")["optimizer_state_dict"]
    assert int(state["zero_stage"]) == 2 and set(state["partition_count"]) == {2}


@pytest.mark.slow
def test_two_process_sft_on_cpu(tmp_path, tiny_checkpoint):
    data = tmp_path / "longalpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in longalpaca_records(12)))
    config = {
        "model_name_or_path": str(tiny_checkpoint),
        "data_files": [str(data)],
        "context_length": 256,
        "max_length": 256,
        "max_steps": 2,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "save_steps": 2,
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "dtype": "float32",
        "padding_free": False,
    }
    result = accelerate_launch(
        ROOT / "examples" / "accelerate" / "ddp_cpu_2proc.yaml",
        ["sft", "--config", str(write_yaml(tmp_path / "sft.yaml", config))],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    # both ranks trained (one RNG state per rank in the checkpoint); our lines print once, on the main process
    assert state["global_step"] == 2 and result.stdout.count("hf-longlora sft: 12 records") == 1
    assert result.stdout.count("hf-longlora sft: adapter saved to") == 1
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint-2").glob("rng_state_*.pth")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]


@pytest.mark.slow
def test_resume_after_kill_reproduces_the_losses(tmp_path, tiny_checkpoint, corpus):
    """Kill a training run after its step-4 checkpoint, resume it, and get the uninterrupted run's losses."""
    import shutil
    import signal
    import time

    def config(out, resume=False):
        data = train_config(
            tmp_path,
            tiny_checkpoint,
            corpus,
            context_length=2048,
            max_steps=8,
            save_steps=2,
            output_dir=str(out),
            seed=7,
        )
        if resume:
            data["resume_from_checkpoint"] = True
        return write_yaml(tmp_path / f"{out.name}-{resume}.yaml", data)

    reference = run_cli(["train", "--config", str(config(tmp_path / "reference"))])
    assert reference.returncode == 0, reference.stderr[-3000:]
    want = {h["step"]: h["loss"] for h in trainer_log_history(tmp_path / "reference") if "loss" in h}

    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_longlora.cli", "train", "--config", str(config(out))],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 600
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "checkpoint-8").exists(), "killed too late to test resuming"
    for late in out.glob("checkpoint-*"):
        if int(late.name.split("-")[1]) > 4:
            shutil.rmtree(late)  # resume from checkpoint-4 exactly, whatever the run reached before the kill

    resumed = run_cli(["train", "--config", str(config(out, resume=True))])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = {h["step"]: h["loss"] for h in trainer_log_history(out) if "loss" in h}
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])


def test_paged_optimizer_needs_cuda(tmp_path, tiny_checkpoint, corpus, capsys):
    config = train_config(
        tmp_path, tiny_checkpoint, corpus, optim="paged_adamw_32bit"
    )  # fails before training
    assert cli.main(["train", "--config", str(write_yaml(tmp_path / "c.yaml", config))]) == 2
    assert "optim='paged_adamw_32bit' needs CUDA" in capsys.readouterr().err


def test_chat_template_prompts_and_overlong_counts(tiny_checkpoint):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hf_longlora.training import SFTDataArguments, prepare_sft_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    records = longalpaca_records(8, long_every=4)
    for policy, dropped, truncated in (("drop", 2, 0), ("truncate", 2, 0)):
        args = SFTDataArguments(prompt_format="chat_template", overlong_policy=policy)
        dataset, counts = prepare_sft_dataset(Dataset.from_list(records), tokenizer, args, max_length=256)
        # the long records' prompts alone exceed max_length, so "truncate" must drop them too
        assert counts == {"records": 8, "overlong_dropped": dropped, "overlong_truncated": truncated}
        assert len(dataset) == 6
        assert dataset[0]["prompt"] == [
            {"role": "user", "content": records[1]["instruction"] + "\n\n" + records[1]["input"].strip()}
        ]
        assert dataset[0]["completion"] == [{"role": "assistant", "content": records[1]["output"]}]
    short_prompt = [{"instruction": "Repeat the text.", "output": "word " * 400}, *records[1:3]]
    args = SFTDataArguments(prompt_format="llama2", overlong_policy="truncate")
    dataset, counts = prepare_sft_dataset(Dataset.from_list(short_prompt), tokenizer, args, max_length=256)
    assert counts == {"records": 3, "overlong_dropped": 0, "overlong_truncated": 1} and len(dataset) == 3
    assert dataset[0]["prompt"] == "[INST] Repeat the text. [/INST]"


# ------------------------------------------------------------------------------------------- recipe scaling


def scaled(tmp_path, command, explicit=(), hidden_size=4096, max_steps=1000, target=32768, **training):
    """scale_recipe on a config-only Llama of the given width (no weights) with the recipe's defaults."""
    from transformers import LlamaConfig, TrainingArguments
    from trl import ModelConfig

    from hf_longlora.training import RECIPE_DEFAULTS, LongLoraArguments, scale_recipe

    path = tmp_path / f"llama-{hidden_size}"
    LlamaConfig(
        hidden_size=hidden_size, num_attention_heads=32, max_position_embeddings=4096
    ).save_pretrained(path)
    defaults = {k: RECIPE_DEFAULTS[k] for k in ("learning_rate", "warmup_steps")}
    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=max_steps, **(defaults | training))
    longlora = LongLoraArguments()
    changes = scale_recipe(
        command, set(explicit), ModelConfig(model_name_or_path=str(path)), longlora, args, target
    )
    return changes, longlora, args


def test_recipe_scaled_to_the_model(tmp_path):
    # SFT: the recipe's fixed group 8192 from 32k up, a quarter of the context below
    changes, longlora, args = scaled(tmp_path, "sft")
    assert changes == {"s2_group_size": 8192} and args.warmup_steps == 20 and args.learning_rate == 2e-5
    assert scaled(tmp_path, "sft", target=100_000)[1].s2_group_size == 8192
    changes, longlora, args = scaled(tmp_path, "sft", target=1024, max_steps=10)
    assert changes == {"s2_group_size": 256, "warmup_steps": 1} and args.warmup_steps == 1
    # continued pretraining keeps ratio 1/4; warmup is 2% of the steps, capped at the recipe's 20
    changes, longlora, args = scaled(tmp_path, "train", max_steps=300, target=8192)
    assert changes == {"warmup_steps": 6} and longlora.s2_group_size is None
    # Llama-2-70B's width: the paper's 1e-5
    assert scaled(tmp_path, "train", hidden_size=8192)[0] == {"learning_rate": 1e-5}
    # keys the user set are never changed
    changes, longlora, args = scaled(
        tmp_path, "sft", explicit={"s2_group_size_ratio", "warmup_steps", "learning_rate"}, hidden_size=8192,
        max_steps=10, warmup_steps=5, learning_rate=3e-4,
    )  # fmt: skip
    assert (
        changes == {}
        and longlora.s2_group_size is None
        and (args.warmup_steps, args.learning_rate) == (5, 3e-4)
    )


def test_rope_options_from_a_yaml_dict_or_a_json_flag(tmp_path):
    from hf_longlora.training import LongLoraArguments

    base = {"model_name_or_path": "m", "rope_method": "yarn", "context_length": 1024}
    for config, flags in (
        ({**base, "rope_options": {"beta_fast": 2, "beta_slow": 1}}, []),
        (base, ["--rope_options", '{"beta_fast": 2, "beta_slow": 1}']),
    ):
        argv = ["--config", str(write_yaml(tmp_path / "c.yaml", config)), *flags]
        parsed = cli.training_parser("train", cli._explicit_keys(argv)).parse_args_and_config(argv)
        longlora = next(a for a in parsed if isinstance(a, LongLoraArguments))
        assert longlora.rope_options == {"beta_fast": 2, "beta_slow": 1}
    assert LongLoraArguments(rope_method="yarn", rope_options="").rope_options is None


def test_explicit_keys_come_from_the_config_and_the_flags(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"model_name_or_path": "m", "s2_group_size": 64})
    keys = cli._explicit_keys(["--config", str(config), "--warmup_steps", "3", "--learning_rate=0.1"])
    assert keys == {"config", "model_name_or_path", "s2_group_size", "warmup_steps", "learning_rate"}


# ---------------------------------------------------------------------------------------------- precision
# The CPUs we run on differ: AVX2-only (bf16 emulated, 60x slower than fp32) and AVX-512 with native bf16. Each
# side is simulated here on any machine; the unsimulated test checks the machine's own side for real.


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-bf16"])
def simulated_bf16(request, monkeypatch):
    """A CPU-only machine with (AVX-512 BF16) or without (AVX2) native bf16."""
    from hf_longlora.training import recipe as training

    monkeypatch.setattr(training, "bf16_supported", lambda: request.param)
    monkeypatch.setattr(training, "accelerator_available", lambda: False)
    return request.param


@pytest.mark.parametrize("native", [True, False])
def test_bf16_supported_reads_the_cpu_and_the_gpu(monkeypatch, native):
    from hf_longlora.training import bf16_supported

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert bf16_supported() is native
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: not native)  # the GPU decides, not the CPU
    assert bf16_supported() is (not native)


def test_bf16_supported_on_this_machine():
    """For real: oneDNN's answer on this CPU (AVX-512 machines with bf16 say True, AVX2 machines False)."""
    from hf_longlora.training import bf16_supported

    if not torch.cuda.is_available():
        capability = torch.backends.cpu.get_cpu_capability()
        assert bf16_supported() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if capability in ("DEFAULT", "AVX2"):
            assert bf16_supported() is False


def test_recipe_precision_defaults(simulated_bf16):
    """bf16 where it is native, unless the user chose bf16/fp16/dtype; use_cpu on a machine without a GPU."""
    from transformers import HfArgumentParser, TrainingArguments

    from hf_longlora.training import recipe_defaults_for

    parser = HfArgumentParser(TrainingArguments)
    recipe_defaults_for(parser)
    assert parser.get_default("bf16") is simulated_bf16 and parser.get_default("use_cpu") is True
    for key in ("bf16", "fp16", "dtype"):
        parser = HfArgumentParser(TrainingArguments)
        recipe_defaults_for(parser, {key})
        assert parser.get_default("bf16") is False, key


def test_recipe_keeps_use_cpu_off_where_there_is_a_gpu(monkeypatch):
    from transformers import HfArgumentParser, TrainingArguments

    from hf_longlora.training import recipe as training

    monkeypatch.setattr(training, "accelerator_available", lambda: True)
    monkeypatch.setattr(training, "bf16_supported", lambda: True)
    parser = HfArgumentParser(TrainingArguments)
    training.recipe_defaults_for(parser)
    assert parser.get_default("use_cpu") is False and parser.get_default("bf16") is True


@pytest.mark.parametrize("command", ["train", "sft"])
def test_configs_without_precision_keys_parse_on_either_cpu(tmp_path, simulated_bf16, command):
    """The config a new user writes (no use_cpu, no bf16) builds its TrainingArguments on both kinds of CPU: on an
    AVX-512 one the recipe turns bf16 on, and use_cpu (which transformers requires for bf16 on a CPU) comes with it."""
    config = write_yaml(tmp_path / "c.yaml", {"model_name_or_path": "m", "output_dir": str(tmp_path / "o")})
    argv = ["--config", str(config)]
    parsed = cli.training_parser(command, cli._explicit_keys(argv)).parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    training_args = parsed[3] if command == "train" else parsed[1]
    assert training_args.bf16 is simulated_bf16 and training_args.use_cpu is True
    assert training_args.mixed_precision == ("bf16" if simulated_bf16 else "no")
    # an explicit choice always wins, on either machine
    for extra, bf16 in (
        (["--bf16", "true"], True),
        (["--bf16", "false"], False),
        (["--dtype", "float32"], False),
    ):
        parsed = cli.training_parser(command, cli._explicit_keys(argv + extra)).parse_args_and_config(
            argv + extra, return_remaining_strings=True, separate_remaining_strings=True
        )
        assert (parsed[3] if command == "train" else parsed[1]).bf16 is bf16, extra


@pytest.mark.slow
def test_train_without_precision_keys_on_either_cpu(
    tmp_path, tiny_checkpoint, corpus, simulated_bf16, capsys
):
    """`hf-longlora train` with a config that sets neither use_cpu nor bf16 nor dtype trains, in bf16 mixed
    precision where the CPU has native bf16 (simulated on the other kind) and in fp32 elsewhere, and says which."""
    config = train_config(tmp_path, tiny_checkpoint, corpus, max_steps=2, save_steps=2)
    for key in ("use_cpu", "dtype"):
        del config[key]
    code = cli.main(["train", "--config", str(write_yaml(tmp_path / "c.yaml", config))])
    out = capsys.readouterr().out
    assert code == 0
    mode = "bf16 mixed precision" if simulated_bf16 else "no mixed precision"
    assert f"precision: {mode} (chosen automatically: this " in out
    saved = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert saved.bf16 is simulated_bf16 and saved.use_cpu is True
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_train_precision_on_this_machine(tmp_path, tiny_checkpoint, corpus, capsys):
    """Unsimulated: the same config on this machine's own CPU kind (bf16 for real on AVX-512 BF16 CPUs)."""
    from hf_longlora.training import bf16_supported

    config = train_config(tmp_path, tiny_checkpoint, corpus, max_steps=1, save_steps=1)
    for key in ("use_cpu", "dtype"):
        del config[key]
    assert cli.main(["train", "--config", str(write_yaml(tmp_path / "c.yaml", config))]) == 0
    saved = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert saved.bf16 is bf16_supported()
    mode = "bf16 mixed precision" if bf16_supported() else "no mixed precision"
    assert f"precision: {mode}" in capsys.readouterr().out


@pytest.mark.slow
def test_train_on_a_bf16_base_trains_the_norms(tmp_path, tiny_checkpoint, corpus):
    """`dtype: bfloat16`: the norms and embeddings LongLoRA trains keep fp32 master weights, so a small learning
    rate still moves them (in bf16, an AdamW step of 2e-5 on a weight of 1.0 rounds away), and the adapter saves
    them in fp32."""
    from safetensors.torch import load_file

    config = train_config(
        tmp_path, tiny_checkpoint, corpus, dtype="bfloat16", bf16=True, learning_rate=2e-5, warmup_steps=0
    )
    config.update(max_steps=2, save_steps=2)
    assert cli.main(["train", "--config", str(write_yaml(tmp_path / "c.yaml", config))]) == 0
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    base = load_file(tiny_checkpoint / "model.safetensors")
    norms = {k: v for k, v in saved.items() if "norm" in k}
    assert norms and all(v.dtype == torch.float32 for v in norms.values())
    for key, value in norms.items():
        base_key = next(b for b in base if key.endswith(b.removeprefix("model.")) or b in key)
        assert not torch.equal(value, base[base_key].float()), f"{key} did not train"
