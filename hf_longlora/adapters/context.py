"""Context extension: set a model's RoPE parameters (transformers 5 ``rope_parameters``) for a longer context.

LongLoRA uses position interpolation (Chen et al. 2023): positions are divided by
``factor = ceil(target_length / original_length)`` so a model trained at ``original_length`` tokens sees
positions of a ``target_length`` sequence inside the range it was trained on. YaRN and dynamic NTK are offered too.

The original length is recorded in ``config.original_max_position_embeddings`` (transformers' own name for the
pretraining length), so calling :func:`extend_context` again recomputes the factor from the original instead of
compounding it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedConfig

ROPE_METHODS = ("linear", "yarn", "dynamic")
# transformers' optional ``rope_parameters`` per method that ``rope_options`` may set
ROPE_OPTIONS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "dynamic": (),
    "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"),
}


def check_rope_options(method: str, options: Mapping[str, Any] | None, name: str = "rope_options") -> dict:
    """``options`` as a dict, checked against the optional RoPE parameters of ``method`` (before any work)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{name} must be a dict of RoPE parameters, got {type(options).__name__}")
    allowed = ROPE_OPTIONS.get(method, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{name}: {unknown} not allowed with rope_method={method!r}; allowed: {list(allowed) or 'none'}"
        )
    for key, value in options.items():
        if key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"{name}[{key!r}] must be a bool, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name}[{key!r}] must be a positive number, got {value!r}")
    if "beta_fast" in options and "beta_slow" in options and options["beta_slow"] >= options["beta_fast"]:
        raise ValueError(
            f"{name}: beta_slow ({options['beta_slow']}) must be below beta_fast ({options['beta_fast']})"
        )
    return dict(options)


def _config_of(model_or_config) -> tuple[PreTrainedConfig, torch.nn.Module | None]:
    if isinstance(model_or_config, PreTrainedConfig):
        return model_or_config, None
    if isinstance(model_or_config, torch.nn.Module) and isinstance(
        getattr(model_or_config, "config", None), PreTrainedConfig
    ):
        return model_or_config.config, model_or_config
    raise TypeError(
        "extend_context: model_or_config must be a transformers model or a PreTrainedConfig, got "
        f"{type(model_or_config).__name__}"
    )


def _text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The config that holds RoPE: the text config of a composite model, else the config itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def original_context_length(model_or_config) -> int:
    """The context length the model was pretrained with (before any :func:`extend_context`)."""
    config = _text_config(_config_of(model_or_config)[0])
    original = getattr(config, "original_max_position_embeddings", None)
    return int(original if original is not None else config.max_position_embeddings)


def context_length(model_or_config) -> int:
    """The context length the model is set up for now (``max_position_embeddings``, or the dynamic target)."""
    config = _text_config(_config_of(model_or_config)[0])
    return int(getattr(config, "longlora_context_length", None) or config.max_position_embeddings)


def rope_parameters_for(
    method: str,
    original_length: int,
    target_length: int,
    base: dict[str, Any],
    options: Mapping[str, Any] | None = None,
) -> dict:
    """The ``rope_parameters`` dict for extending ``original_length`` to ``target_length`` (plus ``options``)."""
    options = check_rope_options(method, options)
    theta = base.get("rope_theta")
    params: dict[str, Any] = {"rope_theta": theta} if theta is not None else {}
    if "partial_rotary_factor" in base:
        params["partial_rotary_factor"] = base["partial_rotary_factor"]
    if method == "linear":
        params.update(rope_type="linear", factor=float(math.ceil(target_length / original_length)))
    elif method == "dynamic":
        params.update(rope_type="dynamic", factor=float(target_length / original_length))
    elif method == "yarn":
        params.update(
            rope_type="yarn",
            factor=float(target_length / original_length),
            original_max_position_embeddings=original_length,
        )
    else:
        raise ValueError(f"rope_method must be one of {ROPE_METHODS}, got {method!r}")
    params.update(options)
    return params


def extend_context(
    model_or_config,
    target_length: int,
    method: str = "linear",
    rope_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Set the RoPE parameters so the model handles ``target_length`` tokens.

    Args:
        model_or_config: a transformers causal LM (its rotary embeddings are rebuilt in place) or a config
            (for a model not built yet).
        target_length: the context to extend to, in tokens. Must be >= the current context.
        method: "linear" (position interpolation, LongLoRA's choice: ``factor = ceil(target / original)``),
            "yarn" (``factor = target / original``) or "dynamic" (dynamic NTK; ``max_position_embeddings`` stays
            at the original length because dynamic NTK scales from there as sequences grow).
        rope_options: optional RoPE parameters of the method, as transformers names them (``ROPE_OPTIONS``);
            for "yarn": ``beta_fast`` / ``beta_slow`` (the ramp between the dimensions kept as they are and the
            interpolated ones, in rotations over the original context; transformers' defaults 32 / 1 suit a
            4k-token model), ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate``.

    Returns:
        The new ``rope_parameters``.

    Raises:
        ValueError: an unknown method or option, a target shorter than the current context, or a model whose
            RoPE is already scaled by something other than :func:`extend_context` (e.g. Llama 3.1's "llama3").

    Calling it again with the same target changes nothing; with a larger target the factor is recomputed from
    the original length (it never compounds).
    """
    if method not in ROPE_METHODS:
        raise ValueError(f"method must be one of {ROPE_METHODS}, got {method!r}")
    options = check_rope_options(method, rope_options)
    if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length < 1:
        raise ValueError(f"target_length must be a positive int, got {target_length!r}")
    top_config, model = _config_of(model_or_config)
    config = _text_config(top_config)
    current_params = dict(getattr(config, "rope_parameters", None) or {})
    if not current_params:
        raise ValueError(
            f"extend_context: {type(config).__name__} has no RoPE parameters (not a RoPE model?)"
        )
    if "full_attention" in current_params or "sliding_attention" in current_params:
        raise ValueError("extend_context: per-layer-type RoPE parameters are not supported")
    extended_before = getattr(config, "original_max_position_embeddings", None) is not None
    current_type = current_params.get("rope_type", "default")
    if current_type != "default" and not extended_before:
        raise ValueError(
            f"extend_context: the model already uses rope_type={current_type!r}; it supports models with plain RoPE "
            "(rope_type 'default') or ones extended by extend_context"
        )
    original = original_context_length(config)
    current = context_length(config)
    if target_length < current:
        raise ValueError(
            f"target_length={target_length} is shorter than the model's current context of {current} tokens; "
            "extend_context only extends"
        )
    if target_length <= original:
        if options:
            raise ValueError(
                f"rope_options given but target_length={target_length} does not extend the model's "
                f"{original} tokens"
            )
        return current_params  # nothing to extend
    params = rope_parameters_for(method, original, target_length, current_params, options)
    if target_length == current and extended_before and params == current_params:
        return current_params  # idempotent
    config.rope_parameters = params
    config.original_max_position_embeddings = original
    config.longlora_context_length = target_length
    config.max_position_embeddings = original if method == "dynamic" else target_length
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    if model is not None:
        _rebuild_rotary_embeddings(model)
    return params


def _rebuild_rotary_embeddings(model: torch.nn.Module) -> None:
    """Recompute every rotary embedding module's frequencies from its (updated) config."""
    replacements = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and isinstance(
            getattr(module, "config", None), PreTrainedConfig
        ):
            replacements.append((name, module))
    for name, module in replacements:
        device = module.inv_freq.device if hasattr(module, "inv_freq") else None
        new = type(module)(module.config)
        if device is not None:
            new = new.to(device)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
