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
"""

from .attention import S2_ATTENTION, S2Settings, configure_s2, register_s2_attention, s2_attention_forward

__version__ = "0.1.0.dev0"

register_s2_attention()

__all__ = [
    "S2_ATTENTION",
    "S2Settings",
    "__version__",
    "configure_s2",
    "register_s2_attention",
    "s2_attention_forward",
]
