"""Long-context training entry points: continued pretraining (transformers Trainer) and SFT (TRL's SFTTrainer).

Both follow the same path: check the arguments and the data, then load the model with :func:`load_model`
(context extension, ``s2_attention``, optional NF4), wrap it with :func:`get_longlora_model`, and train with the
callbacks of :mod:`hf_longlora.callbacks`. Everything that can be checked is checked before the model loads.

Defaults follow LongLoRA's recipe (Chen et al. 2024): LoRA r=8 / alpha=16 / dropout 0 on q, k, v, o with trainable
embeddings and norms, AdamW (0.9, 0.95), learning rate 2e-5, weight decay 0, 20 warmup steps then constant, per-device
batch 1 with 8 accumulation steps, activation checkpointing, S2 group ratio 1/4. bf16 is on where the hardware has it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, set_seed

from .adapter import get_longlora_model
from .attention import S2_ATTENTION
from .attention.settings import S2Settings
from .callbacks import (
    LongContextEvalCallback,
    S2StateCallback,
    StopOnNonFiniteLossCallback,
    ThroughputMemoryCallback,
    add_longlora_callbacks,
)
from .context import ROPE_METHODS, extend_context
from .loss import ChunkedLossTrainer
from .offline import resolve_model_path
from .peft_config import DEFAULT_TARGET_MODULES, LongLoraConfig

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


@dataclass
class LongLoraArguments:
    """LongLoRA's own settings, on top of TRL's ModelConfig and the trainer's arguments."""

    context_length: int | None = field(
        default=None,
        metadata={"help": "Target context length in tokens (extends RoPE when above the model's)."},
    )
    rope_method: str = field(default="linear", metadata={"help": f"RoPE extension: one of {ROPE_METHODS}."})
    s2_group_size_ratio: float = field(
        default=0.25, metadata={"help": "S2-Attn group size as a fraction of L."}
    )
    s2_group_size: int | None = field(
        default=None, metadata={"help": "Fixed S2-Attn group size (SFT recipe: 8192)."}
    )
    s2_shift: str = field(
        default="partition", metadata={"help": "'partition' (causal) or 'roll' (the paper's)."}
    )
    trainable_embeddings: bool = field(default=True, metadata={"help": "Train the input embeddings in full."})
    trainable_norms: bool = field(default=True, metadata={"help": "Train the norm layers in full."})
    long_eval_lengths: list[int] | None = field(
        default=None, metadata={"help": "Context lengths for the perplexity callback (held-out long text)."}
    )
    passkey_lengths: list[int] | None = field(
        default=None, metadata={"help": "Prompt lengths for the passkey-retrieval callback."}
    )
    long_eval_steps: int = field(
        default=100, metadata={"help": "Run the long-context evaluation every N steps."}
    )
    long_eval_corpus: list[str] | None = field(
        default=None,
        metadata={
            "help": "Held-out long documents for long_eval_lengths: files/directories or 'stdlib' (sft; train "
            "holds out eval_documents of its corpus instead)."
        },
    )

    def __post_init__(self) -> None:
        if self.rope_method not in ROPE_METHODS:
            raise ValueError(f"rope_method must be one of {ROPE_METHODS}, got {self.rope_method!r}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        S2Settings(self.s2_group_size_ratio, self.s2_group_size, self.s2_shift)  # validates the knobs


@dataclass
class CorpusArguments:
    """Where continued pretraining reads its long documents."""

    corpus: list[str] | None = field(
        default=None,
        metadata={
            "help": "Text/.jsonl files or directories; 'stdlib' for the CPython standard library (offline)."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets dataset (name or local path)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name."})
    text_field: str = field(default="text", metadata={"help": "Field holding the text (jsonl / datasets)."})
    document_boundaries: bool = field(
        default=False,
        metadata={
            "help": "Restart positions at each document inside a block (no attention across documents)."
        },
    )
    eval_documents: int = field(
        default=0, metadata={"help": "Hold out this many documents for the long-context evaluation callback."}
    )
    max_documents: int | None = field(default=None, metadata={"help": "Use at most this many documents."})


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


def longlora_config_from(model_args, longlora_args: LongLoraArguments) -> LongLoraConfig:
    targets = model_args.lora_target_modules or list(DEFAULT_TARGET_MODULES)
    return LongLoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=[targets] if isinstance(targets, str) and targets != "all-linear" else targets,
        modules_to_save=model_args.lora_modules_to_save,
        trainable_embeddings=longlora_args.trainable_embeddings,
        trainable_norms=longlora_args.trainable_norms,
    )


def _dtype(name):
    if name in (None, "auto"):
        return None if name is None else "auto"
    return getattr(torch, name) if isinstance(name, str) else name


def load_for_training(model_args, longlora_args: LongLoraArguments, training_args, target: int):
    """Load, extend and wrap the model (the only heavy step, run after every check)."""
    from .loading import load_model

    # seed before the adapter weights are created (LoRA A is random): reruns and resumed runs start identical
    set_seed(training_args.seed, deterministic=bool(getattr(training_args, "full_determinism", False)))
    if training_args.include_num_input_tokens_seen in ("no", False):
        # the throughput callback counts real tokens through the trainer
        training_args.include_num_input_tokens_seen = "non_padding"

    kwargs: dict[str, Any] = {}
    if _dtype(model_args.dtype) is not None:
        kwargs["dtype"] = _dtype(model_args.dtype)
    model = load_model(
        model_args.model_name_or_path,
        context_length=target,
        rope_method=longlora_args.rope_method,
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
        print(f"hf-longlora: base loaded in NF4 (bitsandbytes): {quantized} Linear4bit layers", flush=True)
    return get_longlora_model(model, longlora_config_from(model_args, longlora_args))


def _held_out_tokens(paths: list[str], tokenizer, needed: int) -> list[list[int]]:
    """Tokenized documents of ``long_eval_corpus`` ('stdlib' or files), read until ``needed`` tokens."""
    from .data import read_text_corpus, stdlib_documents, tokenize_documents

    documents = stdlib_documents() if paths == ["stdlib"] else read_text_corpus(paths)
    token_ids: list[list[int]] = []
    for document in documents:
        token_ids += tokenize_documents(tokenizer, [document])
        if sum(map(len, token_ids)) >= needed:
            break
    return token_ids


def _callbacks(longlora_args: LongLoraArguments, tokenizer, eval_token_ids) -> list:
    callbacks = [StopOnNonFiniteLossCallback(), ThroughputMemoryCallback(), S2StateCallback()]
    lengths = longlora_args.long_eval_lengths or []
    passkeys = longlora_args.passkey_lengths or []
    if lengths or passkeys:
        if lengths and not eval_token_ids and longlora_args.long_eval_corpus:
            # the callback scores up to 4 windows per length
            eval_token_ids = _held_out_tokens(longlora_args.long_eval_corpus, tokenizer, 4 * max(lengths))
        if lengths and not eval_token_ids:
            raise ValueError(
                "long_eval_lengths needs held-out documents: set long_eval_corpus (files or 'stdlib'), or "
                "eval_documents > 0 with train"
            )
        callbacks.append(
            LongContextEvalCallback(
                eval_token_ids,
                lengths,
                tokenizer=tokenizer,
                passkey_lengths=passkeys,
                eval_steps=longlora_args.long_eval_steps,
            )
        )
    return callbacks


def run_pretraining(
    model_args,
    corpus_args: CorpusArguments,
    longlora_args: LongLoraArguments,
    training_args,
    recipe_explicit: set[str] | None = None,
):
    """Continued pretraining on long documents packed into blocks of the target context (LongLoRA's first stage).

    ``recipe_explicit``: the keys the user set (the CLI passes them); when given, the other recipe defaults are
    scaled to the model with :func:`scale_recipe`."""
    from datasets import Dataset, load_dataset
    from transformers import default_data_collator

    from .data import pack_documents, read_text_corpus, stdlib_documents, tokenize_documents

    check_no_sequence_parallelism(training_args)
    check_optimizer(training_args, model_args.load_in_4bit)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    target = check_context_extension(
        model_args.model_name_or_path, longlora_args, revision=model_args.model_revision
    )
    if recipe_explicit is not None:
        scale_recipe("train", recipe_explicit, model_args, longlora_args, training_args, target)
    sources = [
        corpus_args.corpus is not None and len(corpus_args.corpus) > 0,
        corpus_args.dataset_name is not None,
    ]
    if sum(sources) != 1:
        raise ValueError("give exactly one of corpus (files, or 'stdlib') and dataset_name")
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision
    )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to join documents with")
    if corpus_args.dataset_name is not None:
        dataset = load_dataset(corpus_args.dataset_name, split=corpus_args.dataset_split)
        if corpus_args.text_field not in dataset.column_names:
            raise ValueError(
                f"dataset {corpus_args.dataset_name!r} has no {corpus_args.text_field!r} field "
                f"(columns: {dataset.column_names}); set text_field"
            )
        documents = [t for t in dataset[corpus_args.text_field] if t and t.strip()]
    elif corpus_args.corpus == ["stdlib"]:
        documents = stdlib_documents()
    else:
        documents = read_text_corpus(corpus_args.corpus, text_field=corpus_args.text_field)
    if corpus_args.max_documents is not None:
        documents = documents[: corpus_args.max_documents]
    if not documents:
        raise ValueError("the corpus is empty")
    n_eval = corpus_args.eval_documents
    if n_eval >= len(documents):
        raise ValueError(
            f"eval_documents={n_eval} leaves no training documents (corpus has {len(documents)})"
        )
    eval_ids = tokenize_documents(tokenizer, documents[len(documents) - n_eval :]) if n_eval else []
    train_ids = tokenize_documents(tokenizer, documents[: len(documents) - n_eval])
    blocks = pack_documents(
        train_ids, target, tokenizer.eos_token_id, document_boundaries=corpus_args.document_boundaries
    )
    if not blocks:
        total = sum(len(t) + 1 for t in train_ids)
        raise ValueError(f"the corpus has {total} tokens, fewer than one block of context_length={target}")
    callbacks = _callbacks(longlora_args, tokenizer, eval_ids)

    model = load_for_training(model_args, longlora_args, training_args, target)
    model.peft_config["default"].training_data = [corpus_args.dataset_name or ",".join(corpus_args.corpus)]
    # the loss in chunks of the sequence: no (seq, vocab) logits (TRL's SFTTrainer does the same for run_sft)
    trainer = ChunkedLossTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(blocks),
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    add_longlora_callbacks(trainer, callbacks)
    trainer.train(resume_from_checkpoint=_resume_arg(training_args))
    trainer.save_model(training_args.output_dir)
    return trainer


def _resume_arg(training_args):
    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", True):
        return True
    return resume


# ----------------------------------------------------------------------------------------------------- SFT

LLAMA2_PROMPT = "[INST] {instruction} [/INST]"
LLAMA2_PROMPT_WITH_INPUT = "[INST] {instruction}\n\n{input} [/INST]"
OVERLONG_POLICIES = ("drop", "truncate")


@dataclass
class SFTDataArguments:
    """LongAlpaca-format data: records ``{"instruction", "output"[, "input"]}``."""

    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local .json/.jsonl files of LongAlpaca records (else TRL's dataset args)."},
    )
    prompt_format: str = field(
        default="llama2",
        metadata={
            "help": "'llama2': LongAlpaca's '[INST] instruction [/INST]'; 'chat_template': the tokenizer's."
        },
    )
    overlong_policy: str = field(
        default="drop",
        metadata={
            "help": "Records longer than max_length: 'drop' them, or 'truncate' the output to fit (the prompt is "
            "kept whole; records whose prompt alone is too long are dropped). Both are counted in the log."
        },
    )

    def __post_init__(self) -> None:
        if self.prompt_format not in ("llama2", "chat_template"):
            raise ValueError(f"prompt_format must be 'llama2' or 'chat_template', got {self.prompt_format!r}")
        if self.overlong_policy not in OVERLONG_POLICIES:
            raise ValueError(
                f"overlong_policy must be one of {OVERLONG_POLICIES}, got {self.overlong_policy!r}"
            )


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


def prepare_sft_dataset(dataset, tokenizer, data_args: SFTDataArguments, max_length: int | None):
    """Check fields, convert to prompt/completion, and apply the over-length policy. Returns (dataset, counts)."""
    for name in ("instruction", "output"):
        if name not in dataset.column_names:
            raise ValueError(f"the SFT dataset has no {name!r} field (columns: {dataset.column_names})")
    if len(dataset) == 0:
        raise ValueError("the SFT dataset is empty")
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
    from trl import SFTTrainer

    check_no_sequence_parallelism(training_args)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    target = check_context_extension(
        model_args.model_name_or_path, longlora_args, revision=model_args.model_revision
    )
    if training_args.max_length is not None and training_args.max_length > target:
        raise ValueError(f"max_length={training_args.max_length} exceeds context_length={target}")
    if recipe_explicit is not None:
        scale_recipe("sft", recipe_explicit, model_args, longlora_args, training_args, target)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    raw = load_longalpaca(data_args, script_args, dataset_args)
    dataset, counts = prepare_sft_dataset(raw, tokenizer, data_args, training_args.max_length)
    print(
        f"hf-longlora sft: {counts['records']} records; over max_length={training_args.max_length}: "
        f"{counts['overlong_dropped']} dropped, {counts['overlong_truncated']} truncated "
        f"(overlong_policy={data_args.overlong_policy})",
        flush=True,
    )
    callbacks = _callbacks(longlora_args, tokenizer, [])

    model = load_for_training(model_args, longlora_args, training_args, target)
    model.peft_config["default"].training_data = [
        ",".join(data_args.data_files) if data_args.data_files else str(script_args.dataset_name)
    ]
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    add_longlora_callbacks(trainer, callbacks)
    trainer.train(resume_from_checkpoint=_resume_arg(training_args))
    trainer.save_model(training_args.output_dir)
    return trainer, counts


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
    print(
        f"hf-longlora {command}: recipe defaults scaled to the model and run: {changes}; "
        f"precision: {describe_precision(training_args, explicit, model_args)}",
        flush=True,
    )
    return changes
