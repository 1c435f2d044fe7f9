"""LongLoRA's recipe (Chen et al. 2024) as defaults of the training commands, scaled to the model and the run, and
the precision choice (bf16 where the hardware computes it natively).

Defaults: LoRA r=8 / alpha=16 / dropout 0 on q, k, v, o with trainable embeddings and norms, AdamW (0.9, 0.95),
learning rate 2e-5, weight decay 0, 20 warmup steps then constant, per-device batch 1 with 8 accumulation steps,
activation checkpointing, S2 group ratio 1/4. This module sets values on parsed arguments; it loads no weights.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig

from .._quiet import say
from ..adapters.config import DEFAULT_TARGET_MODULES
from ..attention.settings import S2Settings
from .arguments import LongLoraArguments

# Training-argument defaults of the LongLoRA recipe (applied to the CLI parsers; a config file overrides them).
RECIPE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-5,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "warmup_steps": 20,
    "lr_scheduler_type": "constant_with_warmup",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "max_steps": 1000,
    "logging_steps": 1,
    "activation_checkpointing": True,
    "report_to": "none",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_modules": list(DEFAULT_TARGET_MODULES),
}


def bf16_supported() -> bool:
    """Whether this machine computes in bf16 natively (so bf16 is faster than fp32, not only smaller).

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: oneDNN's bf16 kernels, which need AVX-512
    (native bf16 arithmetic with AVX-512 BF16 or AMX); on AVX2 CPUs PyTorch falls back to reference kernels and a bf16
    matrix product is tens of times slower than in fp32 (69x on the benchmark machine, ``docs/performance.md``).
    """
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def accelerator_available() -> bool:
    """Whether torch sees a GPU-like accelerator (CUDA, XPU, MPS, ...); without one, training runs on the CPU."""
    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(accelerator is not None and accelerator.is_available())


# The keys that choose the training precision; when the user sets any of them, the recipe chooses nothing.
PRECISION_KEYS = frozenset({"bf16", "fp16", "dtype"})


def recipe_defaults_for(parser, explicit: set[str] | frozenset[str] = frozenset()) -> None:
    """Apply LongLoRA's recipe defaults to a parser's arguments that exist.

    ``explicit``: the keys the user set (:func:`hf_longlora.cli` reads them from the YAML and the flags before
    parsing). Precision: ``bf16`` mixed precision where :func:`bf16_supported`, unless the user set ``bf16``,
    ``fp16`` or ``dtype`` (their choice wins). Without an accelerator ``use_cpu`` defaults to True, which
    transformers' TrainingArguments requires for ``bf16=True`` on a CPU.
    """
    known = {action.dest for action in parser._actions}
    defaults = {k: v for k, v in RECIPE_DEFAULTS.items() if k in known}
    if "bf16" in known:
        # a user's bf16 / fp16 / dtype wins: `dtype: float32` means fp32 (TRL's SFTConfig alone would default to bf16)
        defaults["bf16"] = False if PRECISION_KEYS & set(explicit) else bf16_supported()
    if "use_cpu" in known and not accelerator_available():
        defaults["use_cpu"] = True
    parser.set_defaults(**defaults)


def describe_precision(training_args, explicit: set[str] | frozenset[str], model_args=None) -> str:
    """One phrase for the recipe-defaults line: the precision the run trains in, and who chose it."""
    if training_args.bf16:
        mode = "bf16 mixed precision"
    elif training_args.fp16:
        mode = "fp16 mixed precision"
    else:
        mode = "no mixed precision"
    dtype = getattr(model_args, "dtype", None)
    weights = f", weights {dtype}" if dtype not in (None, "auto") else ""
    if PRECISION_KEYS & set(explicit):
        return f"{mode} (as configured){weights}"
    has = "has" if training_args.bf16 else "lacks"
    if accelerator_available():
        where = f"this GPU {has} native bf16"
    else:
        where = f"this {torch.backends.cpu.get_cpu_capability()} CPU {has} native bf16"
    return f"{mode} (chosen automatically: {where}; set bf16, fp16 or dtype to choose){weights}"


# LongLoRA's SFT recipe: a fixed S2 group of 8192 tokens (at 32k context, a quarter of it).
SFT_GROUP_SIZE = 8192


def scale_recipe(
    command: str, explicit: set[str], model_args, longlora_args: LongLoraArguments, training_args, target: int
) -> dict[str, Any]:
    """Scale the recipe's defaults (Llama-2 7B-70B, 8 GPUs, 1000 steps) to this model, context and run.

    Only keys not in ``explicit`` (the keys the user set) change:

    - ``sft``: a fixed S2 group ``min(8192, context_length // 4)``. From 32k up that is the recipe's 8192; below,
      a quarter of the context, so the longest records get 4 groups as the recipe's 32k ones do and shorter records
      attend in full (a fixed 8192 would be full attention for every record under 8k). Left alone if
      ``s2_group_size`` or ``s2_group_size_ratio`` is set. ``train`` keeps ratio 1/4 (its blocks are all
      ``context_length`` long).
    - ``warmup_steps``: the recipe warms up 20 of 1000 steps; ``min(20, ceil(max_steps / 50))``, at least 1.
    - ``learning_rate``: 1e-5 for models with hidden size >= 8192 (Llama-2-70B, as in the paper), else 2e-5.

    Per-device batch 1 and gradient accumulation 8 stay (the global batch is 8 x the number of processes).
    Returns the changed values (also printed).
    """
    changes: dict[str, Any] = {}
    if command == "sft" and not explicit & {"s2_group_size", "s2_group_size_ratio"}:
        group = max(2, min(SFT_GROUP_SIZE, target // 4))
        S2Settings(longlora_args.s2_group_size_ratio, group, longlora_args.s2_shift)  # validates
        longlora_args.s2_group_size = changes["s2_group_size"] = group
    if "warmup_steps" not in explicit and training_args.max_steps and training_args.max_steps > 0:
        warmup = max(1, min(RECIPE_DEFAULTS["warmup_steps"], -(-training_args.max_steps // 50)))
        if warmup != training_args.warmup_steps:
            training_args.warmup_steps = changes["warmup_steps"] = warmup
    if "learning_rate" not in explicit:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        if getattr(config.get_text_config(), "hidden_size", 0) >= 8192:
            training_args.learning_rate = changes["learning_rate"] = 1e-5
    say(
        f"hf-longlora {command}: recipe defaults scaled to the model and run: {changes}; "
        f"precision: {describe_precision(training_args, explicit, model_args)}"
    )
    return changes
