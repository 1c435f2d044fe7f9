"""Every example and benchmark runs in a tiny configuration, so none can rot."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd, timeout=600):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_demo_in_a_tiny_configuration(tmp_path):
    """`make demo` end to end (base pretraining, hf-longlora train, merge, evaluation), scaled down."""
    args = [str(ROOT / "examples" / "demo.py"), "--out", str(tmp_path / "demo"), "--native", "64"]
    args += ["--base-steps", "12", "--steps", "4", "--max-windows", "2", "--passkey-trials", "1"]
    out = run(args, cwd=tmp_path)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert (summary["native_context"], summary["target_context"]) == (64, 256)
    for stage in ("before", "after"):
        assert set(summary["perplexity"][stage]) == {"64", "128", "256"}
        assert all(v > 1 for v in summary["perplexity"][stage].values())
        assert 0.0 <= summary["passkey"][stage] <= 1.0
    # the merged model is the adapter folded in: same perplexity
    for n, value in summary["perplexity"]["after"].items():
        assert summary["merged_perplexity"][n] == pytest.approx(value, rel=1e-3)
    demo = tmp_path / "demo"
    for path in ("adapter/adapter_model.safetensors", "adapter/README.md", "merged/model.safetensors"):
        assert (demo / path).is_file(), path
    for png in ("perplexity.png", "passkey_before.png", "passkey_after.png"):
        assert (demo / "eval" / png).read_bytes()[:4] == b"\x89PNG", png
    assert "| 256 |" in (demo / "adapter" / "README.md").read_text()  # the card's before/after table
    assert "perplexity at 256 tokens (4x native)" in out

    # a second run reuses the cached base model (same base settings; a lighter LongLoRA stage and evaluation)
    out = run(args + ["--steps", "1", "--skip-merged-eval", "--passkey-depths", "0.5"], cwd=tmp_path)
    assert "base model: reusing" in out


@pytest.mark.slow
def test_demo_on_a_given_model_and_stdlib_data(tmp_path):
    """The `--model` path (used with `--model smollm2`), on a tiny checkpoint instead of the 135M model."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_tiny_checkpoint

    base = make_tiny_checkpoint(tmp_path / "base", max_position_embeddings=128)
    args = [str(ROOT / "examples" / "demo.py"), "--model", str(base), "--data", "stdlib", "--factor", "2"]
    args += ["--max-train-files", "2", "--heldout-files", "1", "--steps", "2", "--max-windows", "1"]
    args += [
        "--passkey-trials",
        "1",
        "--passkey-depths",
        "0.5",
        "--skip-merged-eval",
        "--out",
        str(tmp_path / "d"),
    ]
    out = run(args, cwd=tmp_path)
    assert "native context 128 tokens" in out
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert (summary["native_context"], summary["target_context"]) == (128, 256)
    assert set(summary["perplexity"]["after"]) == {"128", "256"} and summary["merged_perplexity"] is None
    assert len(list((tmp_path / "d" / "data").glob("train_*.txt"))) == 2


@pytest.mark.slow
def test_attention_benchmark_quick():
    out = run([str(ROOT / "benchmarks" / "attention.py"), "--quick"], cwd=ROOT)
    rows = [line for line in out.splitlines() if re.match(r"\s*(bf16|fp32)\s", line)]
    assert len(rows) == 4
    for row in rows:
        assert re.search(r"\d+\.\d+x\s+-?\d+\.\d+%$", row), row


@pytest.mark.slow
def test_sequence_parallel_benchmark_quick():
    """benchmarks/sequence_parallel.py on a tiny model: a cell per length and size (1 and 3 gloo processes), the
    ratio table and the fit."""
    out = run([str(ROOT / "benchmarks" / "sequence_parallel.py"), "--quick"], cwd=ROOT)
    cells = re.findall(r"L=\s*(\d+) sp=(\d): per-rank peak\s+(\d+\.\d+) GiB", out)
    assert [(int(n), int(sp)) for n, sp, _ in cells] == [(48, 1), (48, 3), (96, 1), (96, 3)], out
    assert all(0.1 < float(gib) < 8 for *_, gib in cells)
    assert re.search(r"^\s+96\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+x$", out, re.M), out
    assert re.search(r"^sp=3: a = \d+\.\d+ GiB, b = -?\d+\.\d+ KiB/token", out, re.M), out


@pytest.mark.slow
def test_attention_features_benchmark_quick():
    """benchmarks/attention_features.py: the S2 op before and after sinks/softcap (a git worktree of the old
    commit), and with them against the models' own eager attention; one row per length."""
    has_before = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", "efd0087^{commit}"], capture_output=True
    )
    if has_before.returncode:
        pytest.skip("a clone without the commit before sinks/softcap (efd0087): nothing to compare with")
    out = run([str(ROOT / "benchmarks" / "attention_features.py"), "--quick"], cwd=ROOT)
    rows = re.findall(r"^\s+(\d+) \|\s+\d+\.\d+s\s+\d+\.\d+s\s+[+-]\d+\.\d%", out, re.M)
    assert rows == ["256", "512"], out
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True
    ).stdout
    assert len(listed.strip().splitlines()) == 1, listed  # the temporary worktree is gone


@pytest.mark.slow
def test_attention_memory_benchmark_quick():
    out = run([str(ROOT / "benchmarks" / "attention.py"), "--memory", "--quick"], cwd=ROOT)
    rows = [line for line in out.splitlines() if re.match(r"\s*fp32\s+\d+\s", line)]
    assert len(rows) == 1
    assert re.search(r"\d+\.\d+x\s+\d+\.\d+\s+\d+\.\d+$", rows[0]), rows[0]


@pytest.mark.slow
def test_train_step_benchmark_quick():
    """Every mode of benchmarks/train_step.py on a tiny model, in one process."""
    out = run([str(ROOT / "benchmarks" / "train_step.py"), "--quick"], cwd=ROOT)
    for title in (
        "## speed",
        "## LongLoRA with a fixed",
        "## budget",
        "## SmolLM2",
        "## activation",
        "## LongLoRA step: fused chunked loss",
    ):
        assert title in out, title
    assert "## profile" in out and "aten::" in out
    speed = [line for line in out.splitlines() if re.match(r"\s*(128|256) \|", line)]
    assert len(speed) >= 2
    for row in speed[:2]:  # the speed table: three wall-time and two CPU-time ratios per length
        assert len(re.findall(r"\d+\.\d+x", row)) == 5, row
    assert re.search(r"peak memory full FT / LongLoRA: \d+\.\d+x", out)
    # the loss table: fused, checkpointed and plain CPU seconds and the checkpointed / fused ratio
    assert re.search(r"^\s*128 \|\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+x \|", out, re.MULTILINE)
    # the tensor-level tracker: a step peak per method, and where it was
    assert "## memprofile" in out and re.search(r"step peak \(all classes\)(\s+[\d.]+){3}", out)
    assert out.count("peak of ") >= 3
    # the longest-context table: one row per length and MLP tiling, with its time per token and parts
    assert "## longest context" in out
    for tiling in ("none", "ours", "deepspeed"):
        assert re.search(
            rf"^\s*256\s+{tiling} \|\s+[\d.]+\s+[\d.]+ \|(\s+-?[\d.]+){{7}}$", out, re.MULTILINE
        ), tiling


def test_train_step_benchmark_quick_bf16():
    """The bf16 cells (the issue's setting; too slow to measure on an AVX2 CPU) run and print their ratios."""
    out = run(
        [str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--modes", "speed", "--dtype", "bf16"],
        cwd=ROOT,
    )
    assert "bf16; modes ['speed']" in out
    speed = [line for line in out.splitlines() if re.match(r"\s*(128|256) \|", line)]
    assert len(speed) == 2
    for row in speed:
        assert len(re.findall(r"\d+\.\d+x", row)) == 5, row
