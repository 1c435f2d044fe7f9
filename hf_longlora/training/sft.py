"""Supervised fine-tuning on LongAlpaca-format data through TRL's SFTTrainer (LongLoRA's second stage): records as
prompt/completion pairs (the loss on the completion only), the over-length policy, and the run."""

from __future__ import annotations

import os
from typing import Any

from .._quiet import say
from ..adapters.loading import parse_dtype
from ..adapters.smollm2 import resolve_model_path
from .arguments import SFTDataArguments, resume_arg
from .callbacks import add_longlora_callbacks, build_callbacks
from .checks import (
    check_context_extension,
    check_no_sequence_parallelism,
    check_steps,
    check_supported_keys,
    load_tokenizer,
    remove_stale_checkpoints,
    stale_checkpoints,
)
from .model import load_for_training, save_trained_adapter
from .recipe import scale_recipe
from .schedule import sft_trainer_class

LLAMA2_PROMPT = "[INST] {instruction} [/INST]"

LLAMA2_PROMPT_WITH_INPUT = "[INST] {instruction}\n\n{input} [/INST]"


def longalpaca_to_prompt_completion(record: dict, tokenizer, prompt_format: str) -> dict[str, Any]:
    """One LongAlpaca record as TRL's prompt/completion pair (the loss is on the completion only)."""
    instruction, extra = record["instruction"], (record.get("input") or "").strip()
    if prompt_format == "llama2":
        template = LLAMA2_PROMPT_WITH_INPUT if extra else LLAMA2_PROMPT
        return {
            "prompt": template.format(instruction=instruction, input=extra),
            "completion": " " + record["output"],
        }
    content = f"{instruction}\n\n{extra}" if extra else instruction
    return {
        "prompt": [{"role": "user", "content": content}],
        "completion": [{"role": "assistant", "content": record["output"]}],
    }


def load_longalpaca(data_args: SFTDataArguments, script_args, dataset_args):
    from datasets import load_dataset

    if data_args.data_files:
        missing = [f for f in data_args.data_files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"data_files not found: {missing}")
        return load_dataset("json", data_files=data_args.data_files, split="train")
    if getattr(dataset_args, "datasets", None):
        from trl import get_dataset

        return get_dataset(dataset_args)[script_args.dataset_train_split]
    if script_args.dataset_name:
        return load_dataset(script_args.dataset_name, name=script_args.dataset_config)[
            script_args.dataset_train_split
        ]
    raise ValueError("no SFT data: set data_files, dataset_name or datasets")


def _token_ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def check_longalpaca_records(dataset) -> None:
    """Every record has a string ``instruction`` and ``output`` (``input`` a string or missing): the error names
    the first bad record (0-based, in file order) and field, before any work."""
    shape = 'LongAlpaca records are {"instruction": str, "output": str, "input": str (optional)}'
    columns = {
        name: dataset[name] for name in ("instruction", "output", "input") if name in dataset.column_names
    }
    for index in range(len(dataset)):
        for name, values in columns.items():
            value = values[index]
            if name == "input" and value is None:
                continue
            if not isinstance(value, str):
                kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
                raise ValueError(f"SFT record {index}: {name!r} is {kind} ({shape})")


def prepare_sft_dataset(dataset, tokenizer, data_args: SFTDataArguments, max_length: int | None):
    """Check fields, convert to prompt/completion, and apply the over-length policy. Returns (dataset, counts)."""
    for name in ("instruction", "output"):
        if name not in dataset.column_names:
            raise ValueError(f"the SFT dataset has no {name!r} field (columns: {dataset.column_names})")
    if len(dataset) == 0:
        raise ValueError("the SFT dataset is empty")
    check_longalpaca_records(dataset)
    keep = [c for c in dataset.column_names if c not in ("instruction", "output", "input")]
    converted = dataset.map(
        lambda r: longalpaca_to_prompt_completion(r, tokenizer, data_args.prompt_format),
        remove_columns=keep + [c for c in ("instruction", "output", "input") if c in dataset.column_names],
    )
    counts = {"records": len(converted), "overlong_dropped": 0, "overlong_truncated": 0}
    if max_length is None:
        return converted, counts

    def lengths(example):
        if data_args.prompt_format == "llama2":
            prompt = tokenizer(example["prompt"])["input_ids"]
            full = tokenizer(example["prompt"] + example["completion"])["input_ids"]
        else:
            # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
            prompt = _token_ids(
                tokenizer.apply_chat_template(example["prompt"], tokenize=True, add_generation_prompt=True)
            )
            full = _token_ids(
                tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True)
            )
        return {"_prompt_len": len(prompt), "_len": len(full) + 1}  # + EOS

    measured = converted.map(lengths)
    overlong = [i for i, n in enumerate(measured["_len"]) if n > max_length]
    if data_args.overlong_policy == "drop":
        counts["overlong_dropped"] = len(overlong)
        kept = [i for i in range(len(measured)) if i not in set(overlong)]
    else:
        prompt_too_long = {i for i in overlong if measured[i]["_prompt_len"] >= max_length}
        counts["overlong_dropped"] = len(prompt_too_long)
        counts["overlong_truncated"] = len(overlong) - len(prompt_too_long)
        kept = [i for i in range(len(measured)) if i not in prompt_too_long]
    result = measured.select(kept).remove_columns(["_prompt_len", "_len"])
    if len(result) == 0:
        raise ValueError(f"every SFT record is longer than max_length={max_length} ({counts})")
    return result, counts


def run_sft(
    script_args,
    training_args,
    model_args,
    dataset_args,
    longlora_args,
    data_args: SFTDataArguments,
    recipe_explicit: set[str] | None = None,
):
    """Supervised fine-tuning on LongAlpaca-format data through TRL's SFTTrainer (LongLoRA's second stage).

    ``recipe_explicit``: as in :func:`run_pretraining`."""
    check_no_sequence_parallelism(training_args)
    check_supported_keys(recipe_explicit, script_args, model_args, dataset_args, longlora_args, data_args)
    check_steps(training_args, recipe_explicit)
    parse_dtype(model_args.dtype)  # a bad dtype name fails here, before any work
    stale = stale_checkpoints(training_args, longlora_args)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    target = check_context_extension(
        model_args.model_name_or_path, longlora_args, revision=model_args.model_revision
    )
    if training_args.max_length is not None and training_args.max_length > target:
        raise ValueError(
            f"max_length={training_args.max_length} exceeds the model's context of {target} tokens: set "
            f"context_length: {training_args.max_length} to extend it with position interpolation, or lower max_length"
        )
    sequence_parallel = longlora_args.sequence_parallel_size
    if sequence_parallel > 1:
        from transformers import AutoConfig

        from .sequence_parallel import check_sequence_parallel_launch

        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        check_sequence_parallel_launch(sequence_parallel, config)
        if (
            recipe_explicit is not None
            and "padding_free" in recipe_explicit
            and not training_args.padding_free
        ):
            raise ValueError(
                "sequence_parallel_size > 1 needs padding_free: true (one row of packed sequences whose "
                "position_ids mark them); remove padding_free: false"
            )
        training_args.padding_free = True
    if recipe_explicit is not None:
        scale_recipe("sft", recipe_explicit, model_args, longlora_args, training_args, target)
    tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    raw = load_longalpaca(data_args, script_args, dataset_args)
    dataset, counts = prepare_sft_dataset(raw, tokenizer, data_args, training_args.max_length)
    say(
        f"hf-longlora sft: {counts['records']} records; over max_length={training_args.max_length}: "
        f"{counts['overlong_dropped']} dropped, {counts['overlong_truncated']} truncated "
        f"(overlong_policy={data_args.overlong_policy})"
    )
    if training_args.padding_free and not training_args.packing:
        # the records are within max_length now (overlong_policy); TRL refuses a max_length it would not enforce
        training_args.max_length = None
    callbacks = build_callbacks(longlora_args, tokenizer, [])

    model = load_for_training(model_args, longlora_args, training_args, target)
    model.peft_config["default"].training_data = [
        ",".join(data_args.data_files) if data_args.data_files else str(script_args.dataset_name)
    ]
    if sequence_parallel > 1:
        from ..attention.ulysses import register_s2_ulysses

        register_s2_ulysses(model, sequence_parallel, training_args.per_device_train_batch_size)
    trainer = sft_trainer_class()(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer
    )
    if sequence_parallel > 1:
        from .sequence_parallel import SequenceParallelCollator

        trainer.data_collator = SequenceParallelCollator(
            trainer.data_collator, sequence_parallel, tokenizer.pad_token_id
        )
        trainer.sequence_parallel_size = sequence_parallel
    add_longlora_callbacks(trainer, callbacks)
    remove_stale_checkpoints(stale, training_args)
    trainer.train(resume_from_checkpoint=resume_arg(training_args))
    save_trained_adapter(trainer, "sft")
    return trainer, counts
