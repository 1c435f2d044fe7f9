"""Continued pretraining on long documents (LongLoRA's first stage) with transformers' Trainer and the chunked loss.

Everything that can be checked is checked before the model loads; the corpus is tokenized and packed into blocks of
the target context.
"""

from __future__ import annotations

from ..adapters.loading import parse_dtype
from ..adapters.smollm2 import resolve_model_path
from .arguments import CorpusArguments, LongLoraArguments, resume_arg
from .callbacks import add_longlora_callbacks, build_callbacks
from .checks import (
    check_context_extension,
    check_no_sequence_parallelism,
    check_optimizer,
    check_steps,
    check_supported_keys,
    load_tokenizer,
    remove_stale_checkpoints,
    stale_checkpoints,
)
from .loss import ChunkedLossTrainer
from .model import load_for_training, save_trained_adapter
from .recipe import scale_recipe


def packed_blocks_trainer(model, training_args, blocks: list[dict], tokenizer) -> ChunkedLossTrainer:
    """The trainer of ``hf-longlora train``: packed blocks (``pack_documents``) as they are, the loss in chunks of
    the sequence (no ``(seq, vocab)`` logits; TRL's SFTTrainer does the same for ``run_sft``). Benchmarks that
    train outside the CLI (full fine-tuning in ``benchmarks/reproduce.py``) build theirs here, so every row of a
    comparison trains the same way."""
    from datasets import Dataset
    from transformers import default_data_collator

    return ChunkedLossTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(blocks),
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )


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
    from datasets import load_dataset
    from transformers import AutoConfig

    from ..attention.ulysses import register_s2_ulysses
    from ..data import pack_documents, read_text_corpus, stdlib_documents, tokenize_documents
    from .sequence_parallel import check_sequence_parallel_launch

    check_no_sequence_parallelism(training_args)
    check_supported_keys(recipe_explicit, model_args, corpus_args, longlora_args)
    check_steps(training_args, recipe_explicit)
    parse_dtype(model_args.dtype)  # a bad dtype name fails here, before any work
    stale = stale_checkpoints(training_args, longlora_args)
    check_optimizer(training_args, model_args.load_in_4bit)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    target = check_context_extension(
        model_args.model_name_or_path, longlora_args, revision=model_args.model_revision
    )
    sequence_parallel = longlora_args.sequence_parallel_size
    if sequence_parallel > 1:
        if target % sequence_parallel:
            raise ValueError(
                f"context_length={target} (the block length) must be a multiple of sequence_parallel_size="
                f"{sequence_parallel}: each rank holds context_length / sequence_parallel_size tokens"
            )
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        check_sequence_parallel_launch(sequence_parallel, config)
    if recipe_explicit is not None:
        scale_recipe("train", recipe_explicit, model_args, longlora_args, training_args, target)
    sources = [
        corpus_args.corpus is not None and len(corpus_args.corpus) > 0,
        corpus_args.dataset_name is not None,
    ]
    if sum(sources) != 1:
        raise ValueError("give exactly one of corpus (files, or 'stdlib') and dataset_name")
    tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)
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
    callbacks = build_callbacks(longlora_args, tokenizer, eval_ids)

    if sequence_parallel > 1:  # Ulysses needs the positions: they are the only record of the documents
        for block in blocks:
            block.setdefault("position_ids", list(range(len(block["input_ids"]))))
    model = load_for_training(model_args, longlora_args, training_args, target)
    if sequence_parallel > 1:
        register_s2_ulysses(model, sequence_parallel, training_args.per_device_train_batch_size)
    model.peft_config["default"].training_data = [corpus_args.dataset_name or ",".join(corpus_args.corpus)]
    trainer = packed_blocks_trainer(model, training_args, blocks, tokenizer)
    trainer.sequence_parallel_size = sequence_parallel
    add_longlora_callbacks(trainer, callbacks)
    remove_stale_checkpoints(stale, training_args)
    trainer.train(resume_from_checkpoint=resume_arg(training_args))
    save_trained_adapter(trainer, "train")
    return trainer
