"""The command starts at once and says only what is ours: `import hf_longlora` loads no torch (the backend registers
when transformers' modeling code loads), `--help` imports nothing heavy, known dependency noise is dropped."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_help_imports_no_torch():
    result = python(
        "import sys\nfrom hf_longlora import cli\n"
        "for argv in (['--help'], ['eval', '--help'], ['merge', '--help'], ['data', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "hf-longlora eval" in result.stdout and "--context-length" in result.stdout


def test_registration_follows_transformers_either_order():
    """After `import hf_longlora` first (no torch yet), loading transformers' models registers s2_attention; with
    transformers already loaded, `import hf_longlora` registers at once."""
    check = (
        "from transformers import AttentionInterface, PreTrainedConfig\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 's2_attention' in AttentionInterface._global_mapping\n"
        "assert 's2_attention' in AttentionMaskInterface._global_mapping\n"
        "assert isinstance(PreTrainedConfig.__dict__['s2_group_size'], property)\n"
        "from transformers import LlamaConfig, AutoModelForCausalLM\n"
        "c = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,"
        " vocab_size=100)\n"
        "m = AutoModelForCausalLM.from_config(c, attn_implementation='s2_attention')\n"
        "assert m.config._attn_implementation == 's2_attention'\n"
        "print('ok')"
    )
    first = python("import sys\nimport hf_longlora\nassert 'torch' not in sys.modules\n" + check)
    assert first.returncode == 0 and first.stdout.strip() == "ok", first.stderr[-2000:]
    second = python("import transformers.modeling_utils\nimport hf_longlora\n" + check)
    assert second.returncode == 0 and second.stdout.strip() == "ok", second.stderr[-2000:]


def test_public_names_load_on_first_use():
    import hf_longlora

    for name in hf_longlora.__all__:
        assert getattr(hf_longlora, name) is not None, name
    assert set(hf_longlora.__all__) <= set(dir(hf_longlora))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        hf_longlora.nope  # noqa: B018


def test_cli_help_defaults_are_the_evaluations():
    from hf_longlora import cli
    from hf_longlora.evaluation.passkey import DEFAULT_DEPTHS
    from hf_longlora.evaluation.perplexity import DEFAULT_STRIDE, PERPLEXITY_MODES

    assert (cli.DEFAULT_DEPTHS, cli.DEFAULT_STRIDE, cli.PERPLEXITY_MODES) == (
        DEFAULT_DEPTHS,
        DEFAULT_STRIDE,
        PERPLEXITY_MODES,
    )


def test_named_dependency_messages_are_dropped_and_nothing_else(caplog):
    """The filters drop exactly the messages they name (simulated here, so this holds on AVX2 CPUs too, where
    bitsandbytes does not print its AVX-512 notice)."""
    from hf_longlora._quiet import quiet_dependencies

    quiet_dependencies()
    caplog.set_level(logging.WARNING)
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'"
    )
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes problem")
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_dependencies()
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn(
            "find_unused_parameters=True was specified in DDP constructor, but did not find",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


@pytest.mark.slow
def test_a_training_run_prints_only_our_lines(tmp_path):
    """A real `hf-longlora train` in a subprocess: none of the dependency notices, no bars with no_progress, and
    it ends by saying where the adapter is; the adapter's README.md is our model card."""
    import sysconfig

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny", max_position_embeddings=64)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text())
    config = {"model_name_or_path": str(checkpoint), "corpus": str(corpus), "context_length": 128, "max_steps": 2,
              "save_steps": 2, "gradient_accumulation_steps": 1, "output_dir": str(tmp_path / "out"),
              "no_progress": True}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "hf_longlora.cli", "train", "--config", str(tmp_path / "c.yaml")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    both = result.stdout + result.stderr
    for noise in (
        "kernels-community",
        "Setting accelerator to CPU",
        "is deprecated",
        "it/s]",
        "Loading weights",
    ):
        assert noise not in both, (noise, both[-3000:])
    assert result.stderr.strip() == ""
    assert f"hf-longlora train: adapter saved to {tmp_path / 'out'}" in result.stdout
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "trained with [LongLoRA]" in readme and "target context length: 128 tokens" in readme
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["context_length"] == 128
