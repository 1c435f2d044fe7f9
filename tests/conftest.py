import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import hf_longlora  # noqa: E402,F401  (registers the backend)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint with a tokenizer, native context 64 (helpers.make_tiny_checkpoint)."""
    from helpers import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", max_position_embeddings=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of three long text files from the standard library (offline training documents)."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("argparse.py", "typing.py", "inspect.py"):
        (folder / (name[:-3] + ".txt")).write_text((root / name).read_text(encoding="utf-8"))
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Proof that a run failed before loading: loading a model raises AssertionError instead (the commands' loader,
    and under it every transformers ``from_pretrained`` of a model), which the CLI does not catch."""
    from transformers import PreTrainedModel

    from hf_longlora.training import pretraining, sft

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pretraining, "load_for_training", refuse)
    monkeypatch.setattr(sft, "load_for_training", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
