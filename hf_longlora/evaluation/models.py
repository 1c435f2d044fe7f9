"""Load what is evaluated: a base model (optionally position-interpolated), a LongLoRA adapter, or a merged model.

Evaluation always uses full attention (``attn_implementation="sdpa"``, eval mode).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..adapters.context import context_length as current_context_length
from ..adapters.context import extend_context, original_context_length
from ..adapters.smollm2 import resolve_model_path


@dataclass
class EvalModel:
    """A model ready for evaluation and what it is."""

    label: str
    path: str
    kind: str  # "base", "adapter" or "merged"
    model: torch.nn.Module
    tokenizer: object
    original_context: int  # the pretraining context of the base
    context: int  # the context the model is set up for (after any extension)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _tokenizer_for(*candidates: str):
    for candidate in candidates:
        if candidate and Path(candidate).is_dir() and (Path(candidate) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(candidate)
    return AutoTokenizer.from_pretrained(candidates[-1])


def tokenizer_for(path: str, base: str | None = None):
    """The tokenizer of what ``path`` names: its own files, else (for an adapter) its base's."""
    if is_adapter_dir(path):
        from ..adapters.config import LongLoraConfig

        base = base or LongLoraConfig.from_pretrained(path).base_model_name_or_path
        if not base:
            raise ValueError(f"{path} does not name its base model: pass base=")
        return _tokenizer_for(path, resolve_model_path(base))
    return _tokenizer_for(resolve_model_path(path))


def load_for_evaluation(
    path: str,
    *,
    label: str | None = None,
    base: str | None = None,
    context_length: int | None = None,
    rope_method: str = "linear",
    rope_options: dict | None = None,
    dtype: torch.dtype | None = None,
) -> EvalModel:
    """Load ``path`` for evaluation with full attention.

    Args:
        path: a model directory or Hub id (``"smollm2"`` works), or a LongLoRA adapter directory (it holds an
            ``adapter_config.json``): the adapter is loaded onto ``base`` (default: the base recorded in the
            adapter) with the context extension it was trained with.
        base: the base model of an adapter.
        context_length: for a model (not an adapter), extend its context to this many tokens first with
            ``rope_method`` (position interpolation by default) and ``rope_options``: "position interpolation
            alone" baselines.
        dtype: weights dtype (default: the checkpoint's).
    """
    from ..adapters.config import LongLoraConfig
    from ..adapters.lifecycle import load_adapter

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if is_adapter_dir(path):
        if context_length is not None or rope_options:
            raise ValueError(
                "context_length and rope_options apply to a model, not to an adapter (the adapter restores the extension it "
                "was trained with)"
            )
        adapter_config = LongLoraConfig.from_pretrained(path)
        base = base or adapter_config.base_model_name_or_path
        if not base:
            raise ValueError(f"{path} does not name its base model: pass base=")
        base = resolve_model_path(base)
        model = load_adapter(base, path, attn_implementation="sdpa", **kwargs)
        kind, config = "adapter", model.get_base_model().config
    else:
        resolved = resolve_model_path(path)
        config = AutoConfig.from_pretrained(resolved)
        if rope_options and context_length is None:
            raise ValueError("rope_options needs context_length (the extension they shape)")
        if context_length is not None:
            extend_context(config, context_length, rope_method, rope_options)
        model = AutoModelForCausalLM.from_pretrained(
            resolved, config=config, attn_implementation="sdpa", **kwargs
        )
        kind = "merged" if (Path(resolved) / "longlora_adapter_config.json").is_file() else "base"
    model.eval()
    return EvalModel(
        label=label or Path(path).name or path,
        path=str(path),
        kind=kind,
        model=model,
        tokenizer=tokenizer_for(path, base),
        original_context=original_context_length(config),
        context=current_context_length(config),
    )
