"""Trainer callbacks for long-context training; they work with any transformers Trainer or TRL trainer.

Metrics are added to the trainer's log entries (``trainer.state.log_history`` and every reporter). Reporters
(TensorBoard, W&B, ...) see them only if these callbacks run before them: pass them through
:func:`add_longlora_callbacks`, which puts them first.

- :class:`ThroughputMemoryCallback`: ``step_tokens_per_second`` (tokens over the time spent in training steps,
  excluding evaluation and saving) and ``peak_memory_gb`` (process peak RSS on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA) at every log.
- :class:`S2StateCallback`: counts the attention calls that used S2-Attn and full attention, in training steps and
  in evaluation; logs ``s2_attention_calls_train``, ``full_attention_calls_train`` once and warns if training ran
  without S2-Attn or evaluation with it.
- :class:`LongContextEvalCallback`: every ``eval_steps`` optimizer steps, perplexity at several context lengths on
  held-out long documents, passkey retrieval accuracy and RULER task accuracy, with full attention (eval mode).
- :class:`StopOnNonFiniteLossCallback`: a NaN or inf loss (or gradient norm) stops training with a clear error, before
  a checkpoint of the broken state is saved.
- :class:`StopOnSignalCallback`: SIGINT (Ctrl-C) or SIGTERM stops training at the end of the current step with a
  checkpoint of that step; a second signal stops at once.

:func:`last_complete_checkpoint` is the newest checkpoint a killed run left whole (what ``resume_from_checkpoint: true``
resumes from, see :class:`hf_longlora.training.schedule.ResumeFromCompleteCheckpointMixin`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from ..attention.backend import ATTENTION_CALLS

logger = logging.get_logger(__name__)


def add_to_log(state, logs: dict, metrics: dict) -> None:
    """Add metrics to the log being emitted: ``logs`` goes to the reporters, and the trainer has already appended a
    copy of it to ``state.log_history``, which gets them too."""
    logs.update(metrics)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


def peak_memory_bytes() -> int:
    """Peak memory of this process: max allocated on CUDA, else the peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


class ThroughputMemoryCallback(TrainerCallback):
    """Tokens per second of training (between logs) and peak memory.

    Counts the tokens of each batch from ``attention_mask`` (or ``input_ids``) through the trainer's
    ``num_input_tokens_seen`` when enabled, else by the batch shape seen at step begin.
    """

    def __init__(self) -> None:
        self._tokens = 0
        self._elapsed = 0.0
        self._step_start: float | None = None
        self._tokens_at_start = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()
        self._tokens_at_start = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is None:
            return
        self._elapsed += time.perf_counter() - self._step_start
        seen = state.num_input_tokens_seen - self._tokens_at_start
        self._tokens += seen
        self._step_start = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        metrics = {"peak_memory_gb": round(peak_memory_bytes() / 2**30, 4)}
        if self._elapsed > 0 and self._tokens > 0:
            metrics["step_tokens_per_second"] = round(self._tokens / self._elapsed, 2)
        add_to_log(state, logs, metrics)
        self._tokens, self._elapsed = 0, 0.0


class S2StateCallback(TrainerCallback):
    """Show which attention ran where: training steps should use S2-Attn, evaluation full attention."""

    def __init__(self) -> None:
        self._at_step_begin: dict[str, int] | None = None
        self._train = {"s2": 0, "full": 0}
        self._eval_start: dict[str, int] | None = None
        self._reported = False

    def on_step_begin(self, args, state, control, **kwargs):
        self._at_step_begin = dict(ATTENTION_CALLS)

    def on_step_end(self, args, state, control, **kwargs):
        if self._at_step_begin is not None:
            for key in self._train:
                self._train[key] += ATTENTION_CALLS[key] - self._at_step_begin[key]
            self._at_step_begin = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._reported:
            return
        add_to_log(
            state,
            logs,
            {
                "s2_attention_calls_train": self._train["s2"],
                "full_attention_calls_train": self._train["full"],
            },
        )
        model = kwargs.get("model")
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if self._train["s2"] == 0:
            logger.warning(f"training steps did not use S2-Attn (attn_implementation={impl!r})")
        else:
            logger.info(
                f"S2-Attn: {self._train['s2']} attention calls in training steps used S2-Attn, "
                f"{self._train['full']} full attention; evaluation and generation use full attention"
            )
        self._reported = True

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._eval_start is None:
            self._eval_start = dict(ATTENTION_CALLS)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._eval_start is not None:
            s2 = ATTENTION_CALLS["s2"] - self._eval_start["s2"]
            if s2:
                logger.warning(
                    f"evaluation used S2-Attn in {s2} attention calls; it should use full attention"
                )
            if metrics is not None:
                metrics["eval_s2_attention_calls"] = s2
                metrics["eval_full_attention_calls"] = ATTENTION_CALLS["full"] - self._eval_start["full"]
        self._eval_start = None


class LongContextEvalCallback(TrainerCallback):
    """Perplexity at several lengths, passkey and RULER accuracy, logged every ``eval_steps`` optimizer steps.

    Metrics: ``eval_ppl_{L}``, ``eval_passkey_{L}`` and ``eval_ruler_{task}_{L}`` (e.g. ``eval_ruler_vt_4096``).

    Args:
        eval_token_ids: held-out long documents, tokenized (one list of ids per document).
        lengths: context lengths to evaluate perplexity at (non-overlapping windows; see
            :func:`hf_longlora.evaluation.perplexity`).
        tokenizer: needed for passkey retrieval.
        passkey_lengths: prompt lengths for passkey retrieval (empty: skip).
        passkey_trials: prompts per length, one per depth spread over [0, 1]
            (:func:`hf_longlora.evaluation.passkey_accuracy`).
        ruler_tasks: RULER tasks (:data:`hf_longlora.data.ruler.RULER_TASKS`, or ``"all"``; empty: skip).
        ruler_lengths: their sequence lengths (default: ``lengths``).
        ruler_trials: prompts per (task, length) (:func:`hf_longlora.evaluation.ruler_accuracy`).
        eval_steps: run every this many optimizer steps (and at the end of training).
        max_windows: windows per length (evenly spaced over the concatenated documents).
        seed: passkey and RULER seed (the prompts of ``hf-longlora eval --seed`` with the same seed).
    """

    def __init__(
        self,
        eval_token_ids: Sequence[Sequence[int]],
        lengths: Sequence[int],
        *,
        tokenizer=None,
        passkey_lengths: Sequence[int] = (),
        passkey_trials: int = 4,
        ruler_tasks: Sequence[str] = (),
        ruler_lengths: Sequence[int] = (),
        ruler_trials: int = 1,
        eval_steps: int = 100,
        max_windows: int = 4,
        seed: int = 0,
    ) -> None:
        if passkey_lengths and tokenizer is None:
            raise ValueError("LongContextEvalCallback: passkey_lengths needs a tokenizer")
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}")
        from ..data.ruler import check_tasks
        from ..evaluation.ruler import check_lengths

        self.ruler_tasks = check_tasks(ruler_tasks, "ruler_tasks") if ruler_tasks else ()
        if self.ruler_tasks:
            if tokenizer is None:
                raise ValueError("LongContextEvalCallback: ruler_tasks needs a tokenizer")
            self.ruler_lengths = check_lengths(ruler_lengths or lengths, "ruler_lengths (default: lengths)")
        elif ruler_lengths:
            raise ValueError("LongContextEvalCallback: ruler_lengths is set but ruler_tasks is empty")
        else:
            self.ruler_lengths = []
        if isinstance(ruler_trials, bool) or not isinstance(ruler_trials, int) or ruler_trials < 1:
            raise ValueError(f"ruler_trials must be an integer >= 1, got {ruler_trials!r}")
        self.ruler_trials = ruler_trials
        self.stream = [t for doc in eval_token_ids for t in doc]
        too_long = [n for n in lengths if n > len(self.stream)]
        if too_long:
            raise ValueError(
                f"LongContextEvalCallback: held-out text has {len(self.stream)} tokens, < lengths {too_long}"
            )
        self.lengths = list(lengths)
        self.tokenizer = tokenizer
        self.passkey_lengths = list(passkey_lengths)
        self.passkey_trials = passkey_trials
        self.eval_steps = eval_steps
        self.max_windows = max_windows
        self.seed = seed
        self._pending: dict[str, float] = {}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        from ..evaluation.passkey import mean_accuracy, passkey_accuracy
        from ..evaluation.perplexity import perplexity
        from ..evaluation.ruler import ruler_accuracy

        was_training = model.training
        model.eval()  # full attention
        device = next(model.parameters()).device
        metrics: dict[str, float] = {}
        # TRL's SFTTrainer casts a quantized model's trainable weights (LoRA, embeddings, norms) to bf16 and leaves
        # the rest (lm_head) as loaded: its training forward copes, a plain forward and generate need autocast
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        autocast = contextlib.ExitStack()
        if len(dtypes) > 1 and torch.bfloat16 in dtypes:
            autocast.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        try:
            ppl = perplexity(
                model,
                self.stream,
                self.lengths,
                mode="non_overlapping",
                max_windows=self.max_windows,
                progress=False,
            )
            metrics.update({f"eval_ppl_{n}": round(value, 4) for n, value in ppl.items()})
            if self.passkey_lengths:
                depths = [t / max(1, self.passkey_trials - 1) for t in range(self.passkey_trials)]
                cells = passkey_accuracy(
                    model,
                    self.tokenizer,
                    self.passkey_lengths,
                    depths=depths,
                    trials=1,
                    seed=self.seed,
                    progress=False,
                )
                metrics.update({f"eval_passkey_{n}": mean_accuracy(row) for n, row in cells.items()})
            if self.ruler_tasks:
                ruler = ruler_accuracy(
                    model,
                    self.tokenizer,
                    self.ruler_tasks,
                    self.ruler_lengths,
                    trials=self.ruler_trials,
                    seed=self.seed,
                    progress=False,
                )
                metrics.update(
                    {
                        f"eval_ruler_{task}_{n}": value
                        for task, row in ruler.items()
                        for n, value in row.items()
                    }
                )
        finally:
            autocast.close()
            model.train(was_training)
        return metrics

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (
            state.global_step % self.eval_steps == 0 or state.global_step >= state.max_steps
        ):
            self._pending = self.evaluate(model)
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending:
            add_to_log(state, logs, self._pending)
            self._pending = {}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss."""


class StopOnNonFiniteLossCallback(TrainerCallback):
    """Raise :class:`NonFiniteLossError` when a logged loss or gradient norm is NaN or inf.

    Raising from ``on_log`` stops the trainer before it evaluates or saves at that step, so the checkpoints on
    disk are the last good ones. Use ``logging_steps=1`` to catch it at the first bad step. The trainer's
    ``logging_nan_inf_filter`` (which hides NaN losses from the log) is turned off at train begin.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        args.logging_nan_inf_filter = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                last = state.best_model_checkpoint or last_complete_checkpoint(args.output_dir)
                raise NonFiniteLossError(
                    f"training stopped at step {state.global_step}: {key} is {value}. Last good checkpoint: "
                    f"{last or 'none saved yet'}. Lower the learning rate, check the data, or use bf16/fp32."
                )


class StopOnSignalCallback(TrainerCallback):
    """SIGINT (Ctrl-C) or SIGTERM stops training cleanly, with a checkpoint of the last finished step.

    The handlers are installed at train begin (main thread only) and the previous ones put back at train end. The
    first signal lets the current optimizer step finish; at its end the trainer saves ``checkpoint-<step>`` (even
    off ``save_steps``) and stops, and the run ends as usual (the adapter is saved to ``output_dir``) and exits 0.
    Resume with ``resume_from_checkpoint: true``. The first signal also puts the previous handlers back, so a second
    one acts at once as it would have without this callback (KeyboardInterrupt for SIGINT).

    Under several processes (torchrun, accelerate) the ranks agree at every step end (a one-element all-reduce), so
    all of them stop at the same step however the signal reached them.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        self._restore()
        logger.warning(
            f"{signal.Signals(signum).name} received: training stops with a checkpoint at the end of this step "
            "(send it again to stop at once)"
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def _any_rank_received(self, args) -> bool:
        received = self.received is not None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([int(received)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = bool(flag.item())
        return received

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.stopped_at = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
        if self.stopped_at is not None:
            name = (
                signal.Signals(self.received).name
                if self.received is not None
                else "a signal on another rank"
            )
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{self.stopped_at}")
            logger.warning(
                f"training interrupted by {name} after step {self.stopped_at} of {state.max_steps}: saved "
                f"{checkpoint}; resume_from_checkpoint: true continues from it"
            )


def checkpoint_is_complete(path: str | os.PathLike) -> bool:
    """Whether a ``checkpoint-*`` folder was written whole: transformers' ``Trainer._save_checkpoint`` writes the
    weights, optimizer, scheduler and RNG state into the folder itself and ``trainer_state.json`` last, so a run killed
    while saving leaves a folder without a readable one."""
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint-<step>`` folder of ``output_dir`` with the highest step that :func:`checkpoint_is_complete`,
    or None. Incomplete newer ones are logged as skipped (and left untouched)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    try:
        folders = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
    except OSError:
        return None
    steps = sorted(
        (int(p.name.rpartition("-")[2]), p) for p in folders if p.name.rpartition("-")[2].isdigit()
    )
    for _, path in reversed(steps):
        if checkpoint_is_complete(path):
            return str(path)
        logger.warning(
            f"{path} is incomplete (no readable trainer_state.json: the run was killed while saving it)"
        )
    return None


def add_longlora_callbacks(trainer, callbacks: Sequence[TrainerCallback]) -> None:
    """Put ``callbacks`` first in the trainer's handler, so reporters see the metrics they add to the logs."""
    for callback in reversed(list(callbacks)):
        trainer.callback_handler.callbacks.insert(0, callback)


def _held_out_tokens(paths: list[str], tokenizer, needed: int) -> list[list[int]]:
    """Tokenized documents of ``long_eval_corpus`` ('stdlib' or files), read until ``needed`` tokens."""
    from ..data import read_text_corpus, stdlib_documents, tokenize_documents

    documents = stdlib_documents() if paths == ["stdlib"] else read_text_corpus(paths)
    token_ids: list[list[int]] = []
    for document in documents:
        token_ids += tokenize_documents(tokenizer, [document])
        if sum(map(len, token_ids)) >= needed:
            break
    return token_ids


def build_callbacks(longlora_args, tokenizer, eval_token_ids) -> list:
    """The callbacks of a training run: non-finite-loss stop, throughput/memory, S2 state, the stop on SIGINT/SIGTERM,
    and the long-context evaluation when ``long_eval_lengths``, ``passkey_lengths`` or ``ruler_tasks`` are set
    (``longlora_args``: LongLoraArguments)."""
    callbacks = [
        StopOnNonFiniteLossCallback(),
        ThroughputMemoryCallback(),
        S2StateCallback(),
        StopOnSignalCallback(),
    ]
    lengths = longlora_args.long_eval_lengths or []
    passkeys = longlora_args.passkey_lengths or []
    ruler_tasks = longlora_args.ruler_tasks or []
    if lengths or passkeys or ruler_tasks:
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
                eval_token_ids or [],
                lengths,
                tokenizer=tokenizer,
                passkey_lengths=passkeys,
                ruler_tasks=ruler_tasks,
                ruler_lengths=longlora_args.ruler_lengths or [],
                eval_steps=longlora_args.long_eval_steps,
            )
        )
    return callbacks
