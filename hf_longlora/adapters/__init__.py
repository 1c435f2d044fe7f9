"""The adapter part of LongLoRA: everything between a base checkpoint and a trained, published adapter.

- ``config.py``: :class:`LongLoraConfig`, the PEFT config (LoRA + trainable embeddings and norms);
- ``context.py``: :func:`extend_context`, RoPE position interpolation (and yarn / dynamic);
- ``loading.py``: :func:`load_model`, a causal LM ready for LongLoRA (backend, context, optional NF4);
- ``lifecycle.py``: :func:`get_longlora_model`, :func:`load_adapter` (record and restore the extension);
- ``merge.py``: :func:`merge_and_save`; ``hub.py``: :func:`push_to_hub`, :func:`build_model_card`;
- ``smollm2.py``: the offline SmolLM2-135M checkpoint (``"smollm2"`` wherever a model path is accepted).

This package knows the attention backend and nothing of training or evaluation.
"""

from .config import DEFAULT_TARGET_MODULES, LongLoraConfig
from .context import ROPE_METHODS, extend_context
from .hub import build_model_card, push_to_hub
from .lifecycle import get_longlora_model, load_adapter
from .loading import load_model
from .merge import merge_and_save
from .smollm2 import resolve_model_path, smollm2_checkpoint

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "ROPE_METHODS",
    "LongLoraConfig",
    "build_model_card",
    "extend_context",
    "get_longlora_model",
    "load_adapter",
    "load_model",
    "merge_and_save",
    "push_to_hub",
    "resolve_model_path",
    "smollm2_checkpoint",
]
