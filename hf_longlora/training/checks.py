"""Checks a training run passes before any weights load: parallelism S2-Attn cannot run under, optimizers that need
CUDA, and the context extension (validated on a copy of the model's config)."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from ..adapters.context import extend_context
from .arguments import LongLoraArguments


def check_no_sequence_parallelism(training_args) -> None:
    """Refuse the parallelism settings of accelerate and DeepSpeed that cannot run S2-Attn, with what to write
    instead: accelerate's ring context parallelism (``cp_size``, which transformers restricts to ``sdpa``) and
    accelerate's or DeepSpeed's own Ulysses switch (``sp_size``, ``sequence_parallel_size`` in the DeepSpeed config),
    whose ``sp_attn_implementation`` accepts only built-in attention and would re-register it process-wide. Our
    ``sequence_parallel_size`` key drives DeepSpeed's Ulysses directly (:mod:`hf_longlora.attention.ulysses`)."""
    sizes = {}
    config = getattr(training_args, "parallelism_config", None)
    for name in ("cp_size", "sp_size"):
        value = getattr(config, name, None) if config is not None else None
        env = os.environ.get(f"PARALLELISM_CONFIG_{name.upper()}")
        sizes[name] = max(int(value or 1), int(env or 1))
    deepspeed = getattr(training_args, "deepspeed", None)
    if isinstance(deepspeed, dict):
        sizes["sequence_parallel_size"] = int(deepspeed.get("sequence_parallel_size", 1) or 1)
    if sizes["cp_size"] > 1:
        raise ValueError(
            f"cp_size={sizes['cp_size']}: ring context parallelism cannot run s2_attention (transformers restricts it "
            "to attn_implementation='sdpa'). To split long sequences across processes with S2-Attn, remove cp_size "
            "and set `sequence_parallel_size: N` in the hf-longlora config (DeepSpeed's Ulysses)."
        )
    bad = {k: v for k, v in sizes.items() if v > 1}
    if bad:
        name, size = next(iter(bad.items()))
        where = (
            "the DeepSpeed config" if name == "sequence_parallel_size" else "accelerate's parallelism config"
        )
        raise ValueError(
            f"{name}={size} in {where}: accelerate's Ulysses switch accepts only built-in attention "
            "(sp_attn_implementation sdpa/flash_attention_2/3) and would re-register it for the whole process. "
            f"Remove it and set `sequence_parallel_size: {size}` in the hf-longlora config instead: it drives "
            "DeepSpeed's Ulysses with S2-Attn (docs/training.md, 'One sequence across processes')."
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
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs)
    except OSError as exc:
        raise ValueError(
            f"model_name_or_path={model_name_or_path!r}: no config.json there and not a reachable Hub model "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    target = longlora_args.context_length or config.get_text_config().max_position_embeddings
    extend_context(copy.deepcopy(config), target, longlora_args.rope_method, longlora_args.rope_options)
    return target


# Keys of TRL's ModelConfig / ScriptArguments / DatasetMixtureConfig that hf-longlora's commands do not apply: set
# by the user to anything but their default, they are refused (never silently ignored). The value is what to do.
UNSUPPORTED_KEYS: dict[str, tuple[Any, str]] = {
    "use_peft": (
        True,
        "LongLoRA always trains a PEFT adapter; for full fine-tuning use `trl sft` without use_peft",
    ),
    "load_in_8bit": (False, "8-bit bases are not supported; use load_in_4bit: true (QLoRA's NF4)"),
    "bnb_4bit_quant_type": ("nf4", "the 4-bit base is always QLoRA's NF4"),
    "use_bnb_nested_quant": (True, "the 4-bit base always uses QLoRA's double quantisation"),
    "dataset_streaming": (
        False,
        "the SFT data is read whole (records are measured and counted before training)",
    ),
    "streaming": (False, "the SFT data is read whole (records are measured and counted before training)"),
    "ignore_bias_buffers": (False, "not applied by hf-longlora sft"),
    "dataset_test_split": (
        "test",
        "hf-longlora sft trains only; evaluate with long_eval_lengths or hf-longlora eval",
    ),
    "test_split_size": (
        None,
        "hf-longlora sft trains only; evaluate with long_eval_lengths or hf-longlora eval",
    ),
}


def check_supported_keys(explicit: set[str] | None, *parsed_args) -> None:
    """Refuse keys the user set that the command would not apply (``explicit``: the keys set in the YAML or as
    flags; None skips the check, as for Python callers who build the dataclasses themselves)."""
    if explicit is None:
        return
    for key in sorted(explicit & set(UNSUPPORTED_KEYS)):
        allowed, why = UNSUPPORTED_KEYS[key]
        values = [getattr(a, key) for a in parsed_args if hasattr(a, key)]
        if values and values[0] != allowed:
            raise ValueError(f"{key}={values[0]!r} is not supported: {why}")


def check_steps(training_args, explicit: set[str] | None = None) -> None:
    """``max_steps`` counts optimizer steps (the recipe: 1000). -1 is transformers' "train num_train_epochs
    instead", accepted when num_train_epochs is set (or when the caller does not say which keys were set)."""
    steps = training_args.max_steps
    if steps == -1 and (explicit is None or "num_train_epochs" in explicit):
        return
    if steps < 1:
        raise ValueError(
            f"max_steps must be >= 1, got {steps} (LongLoRA's recipe trains 1000 steps; to train by epochs set "
            "num_train_epochs with max_steps: -1)"
        )


def stale_checkpoints(training_args, longlora_args) -> list[Path]:
    """The ``checkpoint-*`` folders another run left in ``output_dir``. Refused unless the user resumes
    (``resume_from_checkpoint``) or asks to replace them (``overwrite_output_dir``); returns those to delete."""
    out = Path(training_args.output_dir)
    found = sorted(p for p in out.glob("checkpoint-*") if p.is_dir()) if out.is_dir() else []
    if not found or training_args.resume_from_checkpoint not in (None, False, "", "false", "False"):
        return []
    if not getattr(longlora_args, "overwrite_output_dir", False):
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(
            f"output_dir {str(out)!r} holds another run's checkpoints ({names}): set resume_from_checkpoint: true "
            "to continue that run, overwrite_output_dir: true to delete them and start again, or choose another "
            "output_dir"
        )
    return found


def remove_stale_checkpoints(paths: list[Path], training_args) -> None:
    """Delete what :func:`stale_checkpoints` returned (once, on the main process), right before training."""
    if paths and training_args.process_index == 0:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


def load_tokenizer(model_name_or_path: str, revision: str | None = None):
    """The model's tokenizer, or a ValueError that says where it was looked for and how to provide one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name_or_path, revision=revision)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"model_name_or_path={model_name_or_path!r} has no usable tokenizer ({str(exc).splitlines()[0]}): save "
            "one next to the model (tokenizer.save_pretrained(folder))"
        ) from exc
