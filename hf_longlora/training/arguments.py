"""The argument dataclasses of ``hf-longlora train`` and ``sft`` (parsed by TRL's TrlParser next to TRL's and
transformers' own): LongLoRA's knobs, the pretraining corpus and the LongAlpaca data.

They validate their own values; they know nothing of models, trainers or the recipe's defaults (``recipe.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..adapters.context import ROPE_METHODS, check_rope_options
from ..attention.settings import S2Settings

OVERLONG_POLICIES = ("drop", "truncate")


def as_list(value):
    """A single value where a list is expected (``corpus: stdlib``, ``data_files: x.jsonl``, ``passkey_lengths:
    1024`` in a YAML) is a one-item list, never a string read one character at a time."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, (str, bytes, int, float, os.PathLike)):
        return [value]
    return list(value)


@dataclass
class LongLoraArguments:
    """LongLoRA's own settings, on top of TRL's ModelConfig and the trainer's arguments."""

    context_length: int | None = field(
        default=None,
        metadata={"help": "Target context length in tokens (extends RoPE when above the model's)."},
    )
    rope_method: str = field(default="linear", metadata={"help": f"RoPE extension: one of {ROPE_METHODS}."})
    rope_options: dict | str | None = field(
        default=None,
        metadata={
            "help": "Optional RoPE parameters of the method, a dict (YAML) or JSON string, e.g. "
            '\'{"beta_fast": 4, "beta_slow": 1}\' for yarn: the ramp between kept and interpolated dimensions, in '
            "rotations over the original context (transformers' 32 / 1 suit 4k-token models)."
        },
    )
    s2_group_size_ratio: float = field(
        default=0.25, metadata={"help": "S2-Attn group size as a fraction of L."}
    )
    s2_group_size: int | None = field(
        default=None, metadata={"help": "Fixed S2-Attn group size (SFT recipe: 8192)."}
    )
    s2_shift: str = field(
        default="partition",
        metadata={
            "help": "'partition' (causal), 'roll' (the paper's) or 'none' (no shift: short attention)."
        },
    )
    trainable_embeddings: bool = field(default=True, metadata={"help": "Train the input embeddings in full."})
    trainable_norms: bool = field(default=True, metadata={"help": "Train the norm layers in full."})
    long_eval_lengths: list[int] | None = field(
        default=None, metadata={"help": "Context lengths for the perplexity callback (held-out long text)."}
    )
    passkey_lengths: list[int] | None = field(
        default=None, metadata={"help": "Prompt lengths for the passkey-retrieval callback."}
    )
    ruler_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "RULER tasks for the evaluation callback: niah_single, niah_multikey, niah_multivalue, "
            "niah_multiquery, vt, cwe, or all (docs/evaluation.md)."
        },
    )
    ruler_lengths: list[int] | None = field(
        default=None, metadata={"help": "Sequence lengths of the RULER tasks (default: long_eval_lengths)."}
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

    sequence_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Split each sequence across this many processes (DeepSpeed's Ulysses, S2-Attn exact on every "
            "rank); the launch needs a multiple of it (accelerate launch --num_processes N)."
        },
    )

    no_progress: bool = field(
        default=False, metadata={"help": "No progress bars (the trainer's, model loading's, datasets')."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an output_dir that holds another run's checkpoints (they are deleted first); "
            "without it such a run is refused unless resume_from_checkpoint is set."
        },
    )

    def __post_init__(self) -> None:
        self.long_eval_lengths = as_list(self.long_eval_lengths)
        self.passkey_lengths = as_list(self.passkey_lengths)
        self.long_eval_corpus = as_list(self.long_eval_corpus)
        self.ruler_tasks = as_list(self.ruler_tasks)
        self.ruler_lengths = as_list(self.ruler_lengths)
        if self.ruler_tasks:
            from ..data.ruler import check_tasks

            check_tasks(self.ruler_tasks, "ruler_tasks")
        elif self.ruler_lengths:
            raise ValueError("ruler_lengths is set but ruler_tasks is empty: name the RULER tasks to run")
        if self.rope_method not in ROPE_METHODS:
            raise ValueError(f"rope_method must be one of {ROPE_METHODS}, got {self.rope_method!r}")
        if isinstance(self.rope_options, str):
            try:
                self.rope_options = json.loads(self.rope_options) if self.rope_options.strip() else None
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"rope_options must be a JSON object, got {self.rope_options!r} ({exc})"
                ) from exc
        self.rope_options = check_rope_options(self.rope_method, self.rope_options) or None
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        S2Settings(self.s2_group_size_ratio, self.s2_group_size, self.s2_shift)  # validates the knobs
        if not isinstance(self.sequence_parallel_size, int) or self.sequence_parallel_size < 1:
            raise ValueError(f"sequence_parallel_size must be >= 1, got {self.sequence_parallel_size!r}")


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

    def __post_init__(self) -> None:
        self.corpus = as_list(self.corpus)
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be >= 1, got {self.max_documents}")
        if self.eval_documents < 0:
            raise ValueError(f"eval_documents must be >= 0, got {self.eval_documents}")


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
        self.data_files = as_list(self.data_files)
        if self.prompt_format not in ("llama2", "chat_template"):
            raise ValueError(f"prompt_format must be 'llama2' or 'chat_template', got {self.prompt_format!r}")
        if self.overlong_policy not in OVERLONG_POLICIES:
            raise ValueError(
                f"overlong_policy must be one of {OVERLONG_POLICIES}, got {self.overlong_policy!r}"
            )


def resume_arg(training_args):
    """``resume_from_checkpoint`` as Trainer.train takes it (YAML's ``true`` arrives as a string)."""
    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", True):
        return True
    return resume
