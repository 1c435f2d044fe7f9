"""load_model: one call that loads a causal LM ready for LongLoRA (backend, context extension, optional NF4)."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..attention import S2_ATTENTION, configure_s2, register_s2_attention
from .context import ROPE_METHODS, check_rope_options, extend_context
from .smollm2 import resolve_model_path

# kwargs of from_pretrained that locate or read the checkpoint, so the config must be read with them too
_LOCATION_KWARGS = (
    "gguf_file",
    "revision",
    "subfolder",
    "cache_dir",
    "token",
    "trust_remote_code",
    "local_files_only",
)
_S2_KWARGS = {"s2_group_size_ratio": "group_size_ratio", "s2_group_size": "group_size", "s2_shift": "shift"}


# Every spelling of a dtype that hf-longlora's commands accept (the same in train, sft, eval and merge).
DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
}


def parse_dtype(name: str | torch.dtype | None, *, argument: str = "dtype") -> torch.dtype | str | None:
    """A dtype from its name (``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``), ``"auto"`` or
    None as given. Raises a ValueError naming ``argument`` and the accepted names otherwise."""
    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"{argument}={name!r} is not a dtype; use one of {sorted(DTYPE_NAMES)} or 'auto'")
    return getattr(torch, DTYPE_NAMES[key])


def is_bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def nf4_quantization_config(
    compute_dtype: torch.dtype = torch.bfloat16, quant_storage: torch.dtype | None = None
):
    """QLoRA's quantisation: NF4 with double quantisation and bf16 compute.

    ``quant_storage`` must equal the model dtype for DeepSpeed ZeRO-3 / FSDP sharding of a 4-bit model.
    """
    if not is_bitsandbytes_available():
        raise ImportError("load_in_4bit=True needs bitsandbytes: pip install 'hf-longlora[quant]'")
    from transformers import BitsAndBytesConfig

    kwargs = {"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **kwargs,
    )


def load_model(
    name_or_path: str,
    *,
    context_length: int | None = None,
    rope_method: str = "linear",
    rope_options: dict[str, Any] | None = None,
    load_in_4bit: bool = False,
    attn_implementation: str = S2_ATTENTION,
    activation_checkpointing: bool = True,
    prepare_for_kbit_training: bool = True,
    bnb_4bit_quant_storage: torch.dtype | str | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM ready for LongLoRA.

    Args:
        name_or_path: a local directory or Hub id (``gguf_file=`` works too); ``"smollm2"`` is the offline
            SmolLM2-135M-Instruct (:func:`hf_longlora.adapters.smollm2.smollm2_checkpoint`).
        context_length: extend the context to this many tokens with :func:`hf_longlora.extend_context`
            (applied to the config before the weights load, so the rotary embeddings are built for it).
        rope_method: "linear" (position interpolation, the paper), "yarn" or "dynamic".
        rope_options: optional RoPE parameters of the method (YaRN's ``beta_fast`` / ``beta_slow`` ...), see
            :func:`hf_longlora.extend_context`.
        load_in_4bit: QLoRA: NF4 weights with double quantisation and bf16 compute through bitsandbytes, then
            ``peft.prepare_model_for_kbit_training``.
        attn_implementation: "s2_attention" (default) or any transformers backend.
        activation_checkpointing: turn activation checkpointing on (non-reentrant), for every model; with
            ``load_in_4bit`` through ``prepare_model_for_kbit_training``. It only acts in training mode.
        prepare_for_kbit_training: with ``load_in_4bit``, run ``prepare_model_for_kbit_training`` (upcasts norms to
            fp32, enables input gradients); False for inference or merging.
        bnb_4bit_quant_storage: with ``load_in_4bit``, the storage dtype of the packed weights; set it to the model
            dtype for DeepSpeed ZeRO-3 / FSDP sharding (QLoRA + ZeRO-3).
        **from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``,
            ...); ``s2_group_size_ratio`` / ``s2_group_size`` / ``s2_shift`` are set on the config.

    All arguments are checked before any weights load.
    """
    if rope_method not in ROPE_METHODS:
        raise ValueError(f"rope_method must be one of {ROPE_METHODS}, got {rope_method!r}")
    check_rope_options(rope_method, rope_options)
    if rope_options and context_length is None:
        raise ValueError("rope_options needs context_length (the options shape the extension to that length)")
    if context_length is not None and (
        isinstance(context_length, bool) or not isinstance(context_length, int)
    ):
        raise ValueError(f"context_length must be an int or None, got {context_length!r}")
    if load_in_4bit and "quantization_config" in from_pretrained_kwargs:
        raise ValueError("pass either load_in_4bit=True or quantization_config, not both")
    storage = (
        getattr(torch, bnb_4bit_quant_storage)
        if isinstance(bnb_4bit_quant_storage, str)
        else bnb_4bit_quant_storage
    )
    quantization_config = nf4_quantization_config(quant_storage=storage) if load_in_4bit else None
    register_s2_attention()
    name_or_path = resolve_model_path(name_or_path)

    s2_knobs = {
        _S2_KWARGS[k]: from_pretrained_kwargs.pop(k) for k in list(from_pretrained_kwargs) if k in _S2_KWARGS
    }
    config = from_pretrained_kwargs.pop("config", None)
    if config is None:
        location = {k: from_pretrained_kwargs[k] for k in _LOCATION_KWARGS if k in from_pretrained_kwargs}
        config = AutoConfig.from_pretrained(name_or_path, **location)
    if s2_knobs:
        configure_s2(config, **s2_knobs)
    if context_length is not None:
        extend_context(config, context_length, rope_method, rope_options)
    if quantization_config is not None:
        from_pretrained_kwargs["quantization_config"] = quantization_config
        from_pretrained_kwargs.setdefault("dtype", torch.bfloat16)

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, config=config, attn_implementation=attn_implementation, **from_pretrained_kwargs
    )
    if load_in_4bit and prepare_for_kbit_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif activation_checkpointing:
        # for every model, not only 4-bit ones; non-reentrant, so frozen inputs still give adapter gradients
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model
