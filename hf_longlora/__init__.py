"""hf_longlora: LongLoRA for the Hugging Face stack.

Importing the package registers the ``s2_attention`` backend with transformers (attention function, mask
function and the ``s2_*`` config knobs), so this works right after ``import hf_longlora``::

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

from . import _moved
from .adapters import (
    LongLoraConfig,
    build_model_card,
    extend_context,
    get_longlora_model,
    load_adapter,
    load_model,
    merge_and_save,
    push_to_hub,
)
from .attention import S2_ATTENTION, S2Settings, configure_s2, register_s2_attention, s2_attention_forward

__version__ = "0.1.0.dev0"

register_s2_attention()
_moved.install()  # the 0.1.0.dev0 module paths (hf_longlora.training.loss, ...) still import, deprecated

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
