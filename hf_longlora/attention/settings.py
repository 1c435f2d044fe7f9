"""The S2-Attn knobs, kept on the model config so they are saved in config.json.

``s2_group_size_ratio`` (float in (0, 1], default 0.25), ``s2_group_size`` (int >= 2 or None) and ``s2_shift``
("partition", "roll" or "none") are installed on transformers' ``PreTrainedConfig`` as validated properties. That is
what lets ``from_pretrained(path, attn_implementation="s2_attention", s2_group_size=8192)`` accept them
(transformers only forwards kwargs the config already has) and makes a bad value fail at load time with a
``ValueError`` naming the knob, before any forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedConfig

from .groups import SHIFT_MODES

DEFAULT_GROUP_SIZE_RATIO = 0.25
DEFAULT_SHIFT = "partition"


def _check_group_size_ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"s2_group_size_ratio must be a float in (0, 1], got {value!r}")
    return float(value)


def _check_group_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"s2_group_size must be an int >= 2 or None, got {value!r}")
    return int(value)


def _check_shift(value: Any) -> str:
    if value not in SHIFT_MODES:
        raise ValueError(f"s2_shift must be one of {SHIFT_MODES}, got {value!r}")
    return value


_KNOBS = {
    "s2_group_size_ratio": (DEFAULT_GROUP_SIZE_RATIO, _check_group_size_ratio),
    "s2_group_size": (None, _check_group_size),
    "s2_shift": (DEFAULT_SHIFT, _check_shift),
}


@dataclass(frozen=True)
class S2Settings:
    """S2-Attn settings as read from a config (validated on construction)."""

    group_size_ratio: float = DEFAULT_GROUP_SIZE_RATIO
    group_size: int | None = None
    shift: str = DEFAULT_SHIFT

    def __post_init__(self) -> None:
        _check_group_size_ratio(self.group_size_ratio)
        _check_group_size(self.group_size)
        _check_shift(self.shift)

    @classmethod
    def from_config(cls, config: PreTrainedConfig) -> S2Settings:
        return cls(
            group_size_ratio=getattr(config, "s2_group_size_ratio", DEFAULT_GROUP_SIZE_RATIO),
            group_size=getattr(config, "s2_group_size", None),
            shift=getattr(config, "s2_shift", DEFAULT_SHIFT),
        )


def _knob_property(name: str, default: Any, check) -> property:
    def getter(self):
        return self.__dict__.get(name, default)

    def setter(self, value):
        self.__dict__[name] = check(value)

    return property(getter, setter, doc=f"hf_longlora S2-Attn knob `{name}` (default {default!r}).")


def install_config_knobs() -> None:
    """Add the validated ``s2_*`` properties to ``PreTrainedConfig`` (idempotent)."""
    for name, (default, check) in _KNOBS.items():
        if not isinstance(PreTrainedConfig.__dict__.get(name), property):
            setattr(PreTrainedConfig, name, _knob_property(name, default, check))


class _Unchanged:
    """The default of :func:`configure_s2`'s knobs: leave the config's current value as it is."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()


def configure_s2(
    model_or_config: torch.nn.Module | PreTrainedConfig,
    *,
    group_size_ratio: float = UNCHANGED,
    group_size: int | None = UNCHANGED,
    shift: str = UNCHANGED,
) -> S2Settings:
    """Set S2-Attn knobs on a model (every config its modules use, e.g. a composite model's text config) or
    on a config. Arguments left out (``UNCHANGED``) keep their current value; a config nobody configured has
    ``group_size_ratio=0.25``, ``group_size=None``, ``shift="partition"``. All values are validated before
    anything is changed; returns the resulting settings.

    Args:
        group_size_ratio: G = int(L * ratio) for a sequence (document) of L tokens, a float in (0, 1].
        group_size: a fixed G (int >= 2) that overrides the ratio; None goes back to the ratio.
        shift: ``"partition"`` (causal, shifted groups), ``"roll"`` (the paper's Algorithm 1) or ``"none"``
            (no shift, the paper's short-attention ablation).

    Example:
        >>> configure_s2(model, group_size=8192)  # LongLoRA's SFT recipe: a fixed group of 8192 tokens
    """
    updates = {}
    if group_size_ratio is not UNCHANGED:
        updates["s2_group_size_ratio"] = _check_group_size_ratio(group_size_ratio)
    if group_size is not UNCHANGED:
        updates["s2_group_size"] = _check_group_size(group_size)
    if shift is not UNCHANGED:
        updates["s2_shift"] = _check_shift(shift)

    if isinstance(model_or_config, PreTrainedConfig):
        configs = [model_or_config]
    elif isinstance(model_or_config, torch.nn.Module):
        configs, seen = [], set()
        for candidate in [getattr(model_or_config, "config", None)] + [
            getattr(m, "config", None) for m in model_or_config.modules()
        ]:
            if isinstance(candidate, PreTrainedConfig) and id(candidate) not in seen:
                seen.add(id(candidate))
                configs.append(candidate)
        if not configs:
            raise ValueError("configure_s2: model_or_config has no transformers config")
    else:
        raise TypeError(
            f"configure_s2: model_or_config must be a torch.nn.Module or a PreTrainedConfig, got "
            f"{type(model_or_config).__name__}"
        )
    for config in configs:
        for name, value in updates.items():
            setattr(config, name, value)
    return S2Settings.from_config(configs[0])
