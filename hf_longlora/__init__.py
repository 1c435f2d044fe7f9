"""hf_longlora: LongLoRA for the Hugging Face stack.

Importing the package registers the ``s2_attention`` backend with transformers (attention function, mask
function and the ``s2_*`` config knobs; at once if transformers' modeling code is loaded, else as soon as it is),
so this works right after ``import hf_longlora``::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="s2_attention")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="s2_attention", s2_group_size=8192)
    model.set_attn_implementation("s2_attention")  # switch an existing model

Public API:

- :data:`S2_ATTENTION`: the backend name, ``"s2_attention"``;
- :func:`configure_s2`: set ``s2_group_size_ratio`` / ``s2_group_size`` / ``s2_shift`` on a model or config;
- :class:`S2Settings`: the knobs as read from a config;
- :func:`s2_attention_forward`: the attention function (transformers' AttentionInterface signature);
- :func:`register_s2_attention`: (re-)register the backend (done on import).

Adapters (LongLoRA = LoRA + trainable embeddings and norms):

- :class:`LongLoraConfig`: the PEFT config (a ``peft.LoraConfig`` subclass);
- :func:`get_longlora_model`: ``get_peft_model`` that records the context extension and keeps tied embeddings tied;
- :func:`load_adapter`: load an adapter onto its base, restoring the context extension it was trained with;
- :func:`extend_context`: RoPE position interpolation (``linear``), ``yarn`` or ``dynamic``;
- :func:`load_model`: load a causal LM ready for LongLoRA (backend, context extension, optional NF4 4-bit);
- :func:`merge_and_save`: fold an adapter into a standalone checkpoint;
- :func:`push_to_hub`, :func:`build_model_card`: publish with a model card.
"""

import importlib

from . import _moved, _registration

__version__ = "0.1.0.dev0"

# The public names, imported on first use (``import hf_longlora`` itself loads neither torch nor PEFT, so the
# ``hf-longlora`` command starts at once); ``from hf_longlora import X`` and ``hf_longlora.X`` work as usual.
_EXPORTS = {
    "S2_ATTENTION": "attention",
    "S2Settings": "attention",
    "configure_s2": "attention",
    "register_s2_attention": "attention",
    "s2_attention_forward": "attention",
    "LongLoraConfig": "adapters",
    "build_model_card": "adapters",
    "extend_context": "adapters",
    "get_longlora_model": "adapters",
    "load_adapter": "adapters",
    "load_model": "adapters",
    "merge_and_save": "adapters",
    "push_to_hub": "adapters",
}

_registration.install()  # s2_attention is registered as soon as transformers' modeling code is loaded
_moved.install()  # the 0.1.0.dev0 module paths (hf_longlora.loss, ...) still import, deprecated


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_longlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "S2_ATTENTION",
    "LongLoraConfig",
    "S2Settings",
    "__version__",
    "build_model_card",
    "configure_s2",
    "extend_context",
    "get_longlora_model",
    "load_adapter",
    "load_model",
    "merge_and_save",
    "push_to_hub",
    "register_s2_attention",
    "s2_attention_forward",
]
