"""Faults, each tested by doing it: a run killed (SIGKILL) while it saves a checkpoint, Ctrl-C (SIGINT) during
training, a run that fails (NaN loss). The faulted runs are real ``hf-longlora train`` processes; see
docs/reliability.md.

The hooks that place a fault at a known moment live only in the faulted subprocess (:data:`FAULTS`, run in place of
``python -m hf_longlora.cli``): a save that writes half a file and then hangs until the test kills it, training steps
slowed down so a signal lands mid-run, a NaN loss from a given step. The signals themselves come from this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hf_longlora import cli
from hf_longlora.training.callbacks import (
    StopOnSignalCallback,
    checkpoint_is_complete,
    last_complete_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_STEPS = 6, 2

FAULTS = r"""
import os, runpy, sys, time
from pathlib import Path

if os.environ.get("FAULT_HANG_IN_SAVE"):  # "checkpoint-4/<file>": half of that file is written, then we hang
    import dataclasses
    import json

    import safetensors.torch as st  # patched before PEFT (imported by transformers) takes save_file from it

    folder, _, name = os.environ["FAULT_HANG_IN_SAVE"].partition("/")

    def hang_if_targeted(path, data: bytes) -> None:
        if Path(path).parent.name == folder and Path(path).name == name:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            Path(os.environ["FAULT_READY"]).touch()
            time.sleep(600)  # the test kills us here, inside the save

    real_save_file = st.save_file

    def save_file(tensors, filename, metadata=None):
        hang_if_targeted(filename, st.save(tensors, metadata=metadata))
        return real_save_file(tensors, filename, metadata=metadata)

    st.save_file = save_file
    from transformers.trainer_callback import TrainerState

    real_save_to_json = TrainerState.save_to_json

    def save_to_json(self, json_path):
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
        hang_if_targeted(json_path, text.encode())
        return real_save_to_json(self, json_path)

    TrainerState.save_to_json = save_to_json

if os.environ.get("FAULT_STEP_SLEEP"):  # seconds added to every training step (the losses do not change)
    from transformers import Trainer

    real_step = Trainer.training_step

    def training_step(self, *args, **kwargs):
        time.sleep(float(os.environ["FAULT_STEP_SLEEP"]))
        return real_step(self, *args, **kwargs)

    Trainer.training_step = training_step

if os.environ.get("FAULT_NAN_FROM_STEP"):  # the loss (and so the gradients) is NaN from this optimizer step on
    from hf_longlora.training.loss import ChunkedLossTrainer

    real_loss = ChunkedLossTrainer.compute_loss

    def compute_loss(self, *args, **kwargs):
        loss = real_loss(self, *args, **kwargs)
        poisoned = self.state.global_step + 1 >= int(os.environ["FAULT_NAN_FROM_STEP"])
        return loss * float("nan") if poisoned else loss

    ChunkedLossTrainer.compute_loss = compute_loss

sys.argv = ["hf-longlora", *sys.argv[1:]]
runpy.run_module("hf_longlora.cli", run_name="__main__")
"""


def train_config(out: Path, checkpoint, corpus, **overrides) -> dict:
    config = {
        "model_name_or_path": str(checkpoint),
        "corpus": [str(corpus)],
        "context_length": 128,
        "max_steps": STEPS,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.002,
        "save_steps": SAVE_STEPS,
        "logging_steps": 1,
        "output_dir": str(out),
        "dtype": "float32",
    }
    config.update(overrides)
    return config


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def train_here(config_file: Path) -> None:
    """An uninterrupted `hf-longlora train` in this process."""
    assert cli.main(["train", "--config", str(config_file)]) == 0


def start_train(tmp_path: Path, config_file: Path, **faults: str) -> subprocess.Popen:
    """`hf-longlora train` in a subprocess, with the fault hooks of :data:`FAULTS` set by ``faults``."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    return subprocess.Popen(
        [sys.executable, str(script), "train", "--config", str(config_file)],
        cwd=ROOT,
        env={**os.environ, **faults},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(
                f"the run ended (rc={process.returncode}) before {path} appeared:\n{err[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.01)


def step_losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_loads(checkpoint: Path, base: Path, step: int) -> None:
    """A checkpoint a run can go on from: its adapter loads onto the base, its trainer state parses."""
    from hf_longlora import load_adapter

    model = load_adapter(str(base), str(checkpoint))
    assert any("lora_B" in name for name, _ in model.named_parameters())
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_checkpoint, corpus) -> dict[int, float]:
    """The per-step losses of the uninterrupted run (same seed and config as the faulted ones)."""
    folder = tmp_path_factory.mktemp("reference")
    train_here(write_yaml(folder / "c.yaml", train_config(folder / "out", tiny_checkpoint, corpus)))
    losses = step_losses(folder / "out" / f"checkpoint-{STEPS}")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


# ------------------------------------------------------------------------------ SIGKILL during a checkpoint save


@pytest.mark.slow
@pytest.mark.parametrize("cut_file", ["adapter_model.safetensors", "trainer_state.json"])
def test_sigkill_during_a_checkpoint_save_resumes_from_the_last_complete_one(
    tmp_path, tiny_checkpoint, corpus, reference, caplog, cut_file
):
    """Killed while writing checkpoint-4 (its weights, first; its trainer state, last): checkpoint-2 loads,
    checkpoint-4 is left as it was (half a file) and `resume_from_checkpoint: true` goes on from checkpoint-2 with
    the very losses of the uninterrupted run."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    config = train_config(out, tiny_checkpoint, corpus)
    ready = tmp_path / "saving"
    process = start_train(
        tmp_path,
        write_yaml(tmp_path / "c.yaml", config),
        FAULT_HANG_IN_SAVE=f"checkpoint-4/{cut_file}",
        FAULT_READY=str(ready),
    )
    try:
        wait_for(ready, process)  # the process is inside the save of checkpoint-4
    finally:
        process.kill()  # SIGKILL
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    cut = out / "checkpoint-4"
    if cut_file == "trainer_state.json":  # the last file written: all the others are whole
        assert load_file(cut / "adapter_model.safetensors") and (cut / "optimizer.pt").is_file()
        with pytest.raises(json.JSONDecodeError):
            json.loads((cut / cut_file).read_text())
    else:
        assert not (cut / "trainer_state.json").exists()
        with pytest.raises(Exception):  # noqa: B017 (safetensors' own error type)
            load_file(cut / cut_file)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert_loads(out / "checkpoint-2", tiny_checkpoint, step=2)
    saved = digests(out / "checkpoint-2")

    train_here(write_yaml(tmp_path / "resume.yaml", config | {"resume_from_checkpoint": True}))
    assert f"{cut} is incomplete" in caplog.text
    assert_same_losses(step_losses(out / f"checkpoint-{STEPS}"), reference)
    assert_loads(out / "checkpoint-4", tiny_checkpoint, step=4)  # written again, whole
    assert digests(out / "checkpoint-2") == saved


# --------------------------------------------------------------------------------------- SIGINT during training


@pytest.mark.slow
def test_sigint_stops_cleanly_with_a_checkpoint_and_resume_reproduces_the_losses(
    tmp_path, tiny_checkpoint, corpus, reference
):
    """Ctrl-C after checkpoint-2 (steps slowed to 0.3 s so it lands mid-run): the run finishes the step it is in,
    saves it as checkpoint-K, says so, exits 0 without a traceback; resuming from it gives the uninterrupted losses."""
    import re

    out = tmp_path / "out"
    config = train_config(out, tiny_checkpoint, corpus)
    process = start_train(tmp_path, write_yaml(tmp_path / "c.yaml", config), FAULT_STEP_SLEEP="0.3")
    try:
        wait_for(out / "checkpoint-2" / "trainer_state.json", process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    found = re.search(rf"training interrupted by SIGINT after step (\d+) of {STEPS}: saved (\S+);", err)
    assert found, err[-3000:]
    step = int(found.group(1))
    assert 2 < step < STEPS and found.group(2) == str(out / f"checkpoint-{step}")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(
        {f"checkpoint-{s}" for s in range(SAVE_STEPS, step + 1, SAVE_STEPS)} | {f"checkpoint-{step}"}
    )
    assert_loads(out / f"checkpoint-{step}", tiny_checkpoint, step=step)
    assert_same_losses(
        step_losses(out / f"checkpoint-{step}"), {s: v for s, v in reference.items() if s <= step}
    )

    train_here(write_yaml(tmp_path / "resume.yaml", config | {"resume_from_checkpoint": True}))
    assert_same_losses(step_losses(out / f"checkpoint-{STEPS}"), reference)


def test_stop_on_signal_callback_handlers():
    """First SIGINT: recorded, and the step end asks for a checkpoint and a stop; the previous handler is back at
    once, so a second SIGINT raises KeyboardInterrupt as usual; train end restores the handlers. SIGTERM alike."""
    from transformers import TrainerControl

    args = SimpleNamespace(device="cpu", output_dir="out")
    state = SimpleNamespace(global_step=3, max_steps=6)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    callback = StopOnSignalCallback()
    control = TrainerControl()
    callback.on_train_begin(args, state, control)
    try:
        assert signal.getsignal(signal.SIGINT) == callback._handle
        callback.on_step_end(args, state, control)
        assert not control.should_save and not control.should_training_stop
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs in the main thread between bytecodes
        assert callback.received == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
        callback.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and callback.stopped_at == 3
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        callback.on_train_end(args, state, control)
    assert {s: signal.getsignal(s) for s in before} == before
    # SIGTERM (a scheduler's preemption) stops the same way
    callback.on_train_begin(args, state, control := TrainerControl())
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert callback.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        callback.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop
    finally:
        callback.on_train_end(args, state, control)
    # a run without signals leaves everything as it was
    callback.on_train_begin(args, state, control := TrainerControl())
    callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)
    assert not control.should_save and callback.stopped_at is None
    assert {s: signal.getsignal(s) for s in before} == before


def test_last_complete_checkpoint_skips_ones_cut_short(tmp_path):
    """The highest step (by number, not by name) whose trainer_state.json reads whole."""
    state = json.dumps({"global_step": 2, "log_history": []}, indent=2)
    for name, text in (
        ("checkpoint-2", state),
        ("checkpoint-9", state),
        ("checkpoint-10", state[: len(state) // 2]),  # cut while writing the trainer state
        ("checkpoint-12", None),  # cut before it
    ):
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "trainer_state.json").write_text(text)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-9")
    assert not checkpoint_is_complete(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path / "missing") is None


# ----------------------------------------------------------------------------- a failing run overwrites nothing


@pytest.mark.slow
def test_a_run_that_fails_overwrites_nothing_already_saved(tmp_path, tiny_checkpoint, corpus):
    """A resumed run whose loss turns NaN at step 3 stops there with one clear line (exit 2): every file the
    earlier run saved (its checkpoints and its final adapter) is byte-identical and nothing is added."""
    out = tmp_path / "out"
    config = train_config(out, tiny_checkpoint, corpus, max_steps=2, save_steps=1)
    train_here(write_yaml(tmp_path / "c.yaml", config))
    saved = digests(out)
    assert "checkpoint-2/adapter_model.safetensors" in saved and "adapter_model.safetensors" in saved

    resume = write_yaml(tmp_path / "resume.yaml", config | {"max_steps": 4, "resume_from_checkpoint": True})
    process = start_train(tmp_path, resume, FAULT_NAN_FROM_STEP="3")
    try:
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert f"step 3: loss is nan. Last good checkpoint: {out / 'checkpoint-2'}." in err
    assert digests(out) == saved
