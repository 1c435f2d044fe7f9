"""S2-Attn (LongLoRA's shifted sparse attention) for transformers.

- :mod:`.groups`: pure group arithmetic (segment boundaries for both head halves), no transformers import;
- :mod:`.sdpa`: variable-length causal attention on PyTorch SDPA;
- :mod:`.flash`: the same on flash-attn 2 (CUDA);
- :mod:`.settings`: the ``s2_*`` config knobs and :func:`configure_s2`;
- :mod:`.backend`: the ``s2_attention`` AttentionInterface function and its registration.

This package imports nothing else of hf_longlora: it knows tensors, masks and transformers' attention API, not
adapters, training or evaluation (``tests/test_layout.py`` checks it).
"""

from .backend import S2_ATTENTION, register_s2_attention, s2_attention_forward
from .groups import S2Plan, plan_s2
from .sdpa import sdpa_varlen_attention
from .settings import S2Settings, configure_s2

__all__ = [
    "S2_ATTENTION",
    "S2Plan",
    "S2Settings",
    "configure_s2",
    "plan_s2",
    "register_s2_attention",
    "s2_attention_forward",
    "sdpa_varlen_attention",
]
