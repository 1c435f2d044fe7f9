"""Checks a training run passes before any weights load: parallelism S2-Attn cannot run under, optimizers that need
CUDA, and the context extension (validated on a copy of the model's config)."""

from __future__ import annotations

import copy
import os

import torch
from transformers import AutoConfig

from ..adapters.context import extend_context
from .arguments import LongLoraArguments


def check_no_sequence_parallelism(training_args) -> None:
    """S2-Attn cannot run under accelerate's context parallelism or DeepSpeed Ulysses: they accept only built-in
    attention implementations and split the sequence across ranks, which would cut S2's groups."""
    sizes = {}
    config = getattr(training_args, "parallelism_config", None)
    for name in ("cp_size", "sp_size"):
        value = getattr(config, name, None) if config is not None else None
        env = os.environ.get(f"PARALLELISM_CONFIG_{name.upper()}")
        sizes[name] = max(int(value or 1), int(env or 1))
    deepspeed = getattr(training_args, "deepspeed", None)
    if isinstance(deepspeed, dict):
        sizes["sequence_parallel_size"] = int(deepspeed.get("sequence_parallel_size", 1) or 1)
    bad = {k: v for k, v in sizes.items() if v > 1}
    if bad:
        raise ValueError(
            f"s2_attention cannot be combined with context/sequence parallelism ({bad}): accelerate's context "
            "parallelism and DeepSpeed Ulysses accept only built-in attention implementations. Use data parallelism "
            "(DDP, DeepSpeed ZeRO) with S2-Attn, or attn_implementation='sdpa' with sequence parallelism."
        )


def check_optimizer(training_args, load_in_4bit: bool) -> None:
    """Paged optimizers (QLoRA's GPU default) need CUDA; on a CUDA machine a 4-bit run defaults to one."""
    optim = str(getattr(training_args, "optim", ""))
    optim = getattr(training_args.optim, "value", optim)
    cuda = torch.cuda.is_available() and not getattr(training_args, "use_cpu", False)
    if "paged" in optim and not cuda:
        raise ValueError(
            f"optim={optim!r} needs CUDA (bitsandbytes pages optimizer state between GPU and CPU memory); "
            "use optim='adamw_torch' on CPU"
        )
    if load_in_4bit and cuda and optim in ("adamw_torch", "adamw_torch_fused"):
        training_args.optim = "paged_adamw_32bit"  # QLoRA's default on GPUs


def check_context_extension(
    model_name_or_path: str, longlora_args: LongLoraArguments, **config_kwargs
) -> int:
    """Validate the context extension on a copy of the model's config (no weights). Returns the target length."""
    config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs)
    target = longlora_args.context_length or config.get_text_config().max_position_embeddings
    extend_context(copy.deepcopy(config), target, longlora_args.rope_method)
    return target
