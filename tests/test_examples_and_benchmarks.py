"""Every example and benchmark runs in a tiny configuration, so none can rot."""

from __future__ import annotations

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
def test_quick_train_example(tmp_path):
    out = run(
        [
            str(ROOT / "examples" / "quick_train.py"),
            "--base-steps",
            "12",
            "--steps",
            "4",
            "--native",
            "64",
            "--out",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
    )
    assert "trained 4 steps at 256 tokens with S2-Attn" in out
    before, after = map(float, re.search(r"256 tokens ([\d.]+) before -> ([\d.]+) after", out).groups())
    assert before > 0 and after > 0
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_attention_benchmark_quick():
    out = run([str(ROOT / "benchmarks" / "attention.py"), "--quick"], cwd=ROOT)
    rows = [line for line in out.splitlines() if re.match(r"\s*(bf16|fp32)\s", line)]
    assert len(rows) == 4
    for row in rows:
        assert re.search(r"\d+\.\d+x\s+-?\d+\.\d+%$", row), row
