"""The model a training run trains: loaded with :func:`hf_longlora.load_model` (context extension, ``s2_attention``,
optional NF4) and wrapped with :func:`hf_longlora.get_longlora_model`, from the parsed arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import set_seed

from .._quiet import say
from ..adapters.config import DEFAULT_TARGET_MODULES, LongLoraConfig
from ..adapters.lifecycle import get_longlora_model
from ..adapters.loading import parse_dtype
from ..attention import S2_ATTENTION
from .arguments import LongLoraArguments


def longlora_config_from(model_args, longlora_args: LongLoraArguments) -> LongLoraConfig:
    """The LongLoraConfig of TRL's ModelConfig (``lora_*``, ``use_rslora``, ``use_dora``) and LongLoRA's knobs."""
    targets = model_args.lora_target_modules or list(DEFAULT_TARGET_MODULES)
    return LongLoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=[targets] if isinstance(targets, str) and targets != "all-linear" else targets,
        target_parameters=getattr(model_args, "lora_target_parameters", None),
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=bool(getattr(model_args, "use_rslora", False)),
        use_dora=bool(getattr(model_args, "use_dora", False)),
        trainable_embeddings=longlora_args.trainable_embeddings,
        trainable_norms=longlora_args.trainable_norms,
    )


def load_for_training(model_args, longlora_args: LongLoraArguments, training_args, target: int):
    """Load, extend and wrap the model (the only heavy step, run after every check)."""
    from ..adapters.loading import load_model

    # seed before the adapter weights are created (LoRA A is random): reruns and resumed runs start identical
    set_seed(training_args.seed, deterministic=bool(getattr(training_args, "full_determinism", False)))
    if training_args.include_num_input_tokens_seen in ("no", False):
        # the throughput callback counts real tokens through the trainer
        training_args.include_num_input_tokens_seen = "non_padding"

    kwargs: dict[str, Any] = {}
    dtype = parse_dtype(model_args.dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = load_model(
        model_args.model_name_or_path,
        context_length=target,
        rope_method=longlora_args.rope_method,
        rope_options=longlora_args.rope_options,
        load_in_4bit=model_args.load_in_4bit,
        attn_implementation=model_args.attn_implementation or S2_ATTENTION,
        activation_checkpointing=bool(
            getattr(training_args, "activation_checkpointing", False) or training_args.gradient_checkpointing
        ),
        revision=model_args.model_revision,
        bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage if model_args.load_in_4bit else None,
        s2_group_size_ratio=longlora_args.s2_group_size_ratio,
        s2_group_size=longlora_args.s2_group_size,
        s2_shift=longlora_args.s2_shift,
        **kwargs,
    )
    model.config.use_cache = False  # packed batches are only detected without a KV cache
    if model_args.load_in_4bit:
        quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
        say(f"hf-longlora: base loaded in NF4 (bitsandbytes): {quantized} Linear4bit layers")
    return get_longlora_model(model, longlora_config_from(model_args, longlora_args))


def save_trained_adapter(trainer, command: str) -> Path:
    """Save the final adapter with our model card as its README.md (PEFT writes an empty template) and say where."""
    from ..adapters.hub import build_model_card

    out = Path(trainer.args.output_dir)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        (out / "README.md").write_text(str(build_model_card(out)), encoding="utf-8")
    say(
        f"hf-longlora {command}: adapter saved to {out} (evaluate: hf-longlora eval --model {out} ...; merge: "
        f"hf-longlora merge --base BASE --adapter {out} --out DIR; Python: hf_longlora.load_adapter(BASE, {str(out)!r}))"
    )
    return out
