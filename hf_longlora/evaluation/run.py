"""Evaluate one or more models side by side: perplexity per length, passkey, forgetting, RULER tasks; JSON, table
and plots."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..data import tokenize_documents
from ..data.ruler import TASK_NAMES, check_tasks, ruler_prompt
from .models import load_for_evaluation, tokenizer_for
from .passkey import DEFAULT_DEPTHS, mean_accuracy, passkey_accuracy
from .perplexity import DEFAULT_STRIDE, PERPLEXITY_MODES, perplexity, token_stream, window_starts
from .ruler import MIN_LENGTH as RULER_MIN_LENGTH
from .ruler import mean_over_tasks, ruler_accuracy, trial_seed

RESULTS_FILE = "eval.json"
logger = logging.get_logger(__name__)

# a warning when a length is more than this many times a model's context (extrapolation far outside training)
EXTRAPOLATION_WARNING = 4

SUMMARY_FILE = "eval_summary.json"  # the short form model cards read (see hf_longlora.adapters.hub)


@dataclass
class ModelSpec:
    """One model to evaluate: ``path`` (model, merged model or adapter directory) and how to load it."""

    path: str
    label: str | None = None
    base: str | None = None  # an adapter's base (default: recorded in the adapter)
    context_length: int | None = None  # extend a model (not an adapter) to this context first
    rope_method: str = "linear"  # how context_length extends it (position interpolation by default)
    rope_options: dict | None = None  # the method's optional RoPE parameters (extend_context's rope_options)

    def __post_init__(self) -> None:  # checked when the spec is made, before any model of a comparison loads
        from ..adapters.context import ROPE_METHODS, check_rope_options

        if self.rope_method not in ROPE_METHODS:
            raise ValueError(f"ModelSpec.rope_method must be one of {ROPE_METHODS}, got {self.rope_method!r}")
        self.rope_options = (
            check_rope_options(self.rope_method, self.rope_options, "ModelSpec.rope_options") or None
        )
        if self.rope_options and self.context_length is None:
            raise ValueError("ModelSpec.rope_options needs context_length (the extension they shape)")


@dataclass
class EvalSettings:
    """What to measure. Lengths are in tokens."""

    lengths: Sequence[int]
    stride: int = DEFAULT_STRIDE
    mode: str = "sliding"
    max_windows: int | None = None
    batch_size: int = 1
    passkey_lengths: Sequence[int] = ()
    passkey_depths: Sequence[float] = DEFAULT_DEPTHS
    passkey_trials: int = 2
    tasks: Sequence[str] = ()  # RULER tasks (hf_longlora.data.ruler.RULER_TASKS, or "all")
    task_lengths: Sequence[int] = ()  # default: lengths
    task_trials: int = 2  # prompts per (task, length)
    forgetting_length: int | None = None  # default: the first model's original context
    forgetting: bool = True  # False: no forgetting window (one pass less per model)
    seed: int = 0
    dtype: torch.dtype | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # recorded as is in the results' "protocol"

    def check(self) -> None:
        """Raise ValueError naming the first bad setting, before any model loads."""
        if not self.lengths:
            raise ValueError("lengths: give at least one context length")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.lengths):
            raise ValueError(f"lengths must be integers >= 2, got {list(self.lengths)}")
        if self.mode not in PERPLEXITY_MODES:
            raise ValueError(f"mode must be one of {PERPLEXITY_MODES}, got {self.mode!r}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {self.max_windows}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.passkey_trials < 1:
            raise ValueError(f"passkey_trials must be >= 1, got {self.passkey_trials}")
        if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths) or not self.passkey_depths:
            raise ValueError(f"passkey_depths must be values in [0, 1], got {list(self.passkey_depths)}")
        if any(n < 16 for n in self.passkey_lengths):
            raise ValueError(f"passkey_lengths must be >= 16 tokens, got {list(self.passkey_lengths)}")
        if self.tasks:
            check_tasks(self.tasks, "tasks")
        elif self.task_lengths:
            raise ValueError(
                f"task_lengths is set but tasks is empty: name the RULER tasks to run ({', '.join(TASK_NAMES)} "
                "or all)"
            )
        if self.task_lengths and any(
            isinstance(n, bool) or not isinstance(n, int) or n < RULER_MIN_LENGTH for n in self.task_lengths
        ):
            raise ValueError(
                f"task_lengths must be integers >= {RULER_MIN_LENGTH} tokens, got {list(self.task_lengths)}"
            )
        if (
            isinstance(self.task_trials, bool)
            or not isinstance(self.task_trials, int)
            or self.task_trials < 1
        ):
            raise ValueError(f"task_trials must be an integer >= 1, got {self.task_trials!r}")

    def ruler_tasks(self) -> tuple[str, ...]:
        """The RULER tasks to run (``"all"`` expanded), in order."""
        return check_tasks(self.tasks, "tasks") if self.tasks else ()

    def ruler_lengths(self) -> list[int]:
        """The RULER prompt lengths: ``task_lengths``, else ``lengths``."""
        return list(self.task_lengths or self.lengths)


def _perplexity(model, stream, lengths, settings: EvalSettings, description: str) -> dict[int, float]:
    """:func:`perplexity` with the window protocol of ``settings``."""
    return perplexity(
        model,
        stream,
        lengths,
        stride=settings.stride,
        mode=settings.mode,
        max_windows=settings.max_windows,
        batch_size=settings.batch_size,
        progress=settings.progress,
        description=description,
    )


def evaluate_models(
    specs: Sequence[ModelSpec],
    documents: Sequence[str],
    settings: EvalSettings,
    *,
    forgetting_documents: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate each model in turn (one in memory at a time) on the same windows and passkey prompts.

    Args:
        specs: the models; labels must be unique (the first one is the baseline for the forgetting delta).
        documents: held-out long documents (text).
        settings: lengths, protocol and passkey settings.
        forgetting_documents: held-out text of the base model's domain, scored at the base's original context
            (default: ``documents``).
        out_dir: if given, write ``eval.json``, ``eval_summary.json``, ``perplexity.png`` and, per model,
            ``passkey_<label>.png`` and ``ruler_<label>.png`` there.

    Returns the results dict written to ``eval.json``.
    """
    settings.check()
    if not specs:
        raise ValueError("give at least one model to evaluate")
    labels = [s.label or Path(s.path).name or s.path for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}: pass a label per model")
    if not documents:
        raise ValueError("documents: the evaluation text is empty")
    same_text = not forgetting_documents
    forgetting_documents = forgetting_documents or documents
    # fail on a text too short for the longest window before any model loads
    tokenizer = tokenizer_for(specs[0].path, specs[0].base)
    n_tokens = len(token_stream(tokenize_documents(tokenizer, documents), tokenizer.eos_token_id))
    for n in settings.lengths:
        window_starts(n_tokens, n, stride=settings.stride, mode=settings.mode)
    tasks = settings.ruler_tasks()
    if tasks:  # and on a RULER length too short for a task's prompt with this tokenizer
        shortest = min(settings.ruler_lengths())
        for task in tasks:
            ruler_prompt(task, tokenizer, shortest, trial_seed(task, shortest, 0, settings.seed))

    results: dict[str, Any] = {
        "protocol": {
            "mode": settings.mode,
            "stride": settings.stride if settings.mode == "sliding" else None,
            "max_windows": settings.max_windows,
            "passkey_depths": list(settings.passkey_depths),
            "passkey_trials": settings.passkey_trials,
            **({"ruler_trials": settings.task_trials, "ruler_metric": "string_match_all"} if tasks else {}),
            "seed": settings.seed,
            "attention": "full (sdpa, eval mode)",
            **settings.extra,
        },
        "models": {},
    }
    forgetting_length = settings.forgetting_length
    for spec, label in zip(specs, labels, strict=True):
        torch.manual_seed(settings.seed)
        loaded = load_for_evaluation(
            spec.path,
            label=label,
            base=spec.base,
            context_length=spec.context_length,
            rope_method=spec.rope_method,
            rope_options=spec.rope_options,
            dtype=settings.dtype,
        )
        tokenizer = loaded.tokenizer
        eos = tokenizer.eos_token_id
        stream = token_stream(tokenize_documents(tokenizer, documents), eos)
        entry: dict[str, Any] = {
            "path": spec.path,
            "kind": loaded.kind,
            "original_context": loaded.original_context,
            "context": loaded.context,
            "eval_tokens": len(stream),
        }
        beyond = [
            n
            for n in [
                *settings.lengths,
                *settings.passkey_lengths,
                *(settings.ruler_lengths() if tasks else []),
            ]
            if n > EXTRAPOLATION_WARNING * loaded.context
        ]
        if beyond:
            logger.warning(
                f"{label} has a context of {loaded.context} tokens; lengths {sorted(set(beyond))} are more than "
                f"{EXTRAPOLATION_WARNING}x beyond it: they measure extrapolation (expect high perplexity) and cost "
                "time and memory that grow with the length"
            )
        entry["perplexity"] = _perplexity(
            loaded.model, stream, settings.lengths, settings, f"{label}: perplexity"
        )
        if not settings.forgetting:
            entry["forgetting"] = None
        elif forgetting_length is None:
            forgetting_length = loaded.original_context
        if settings.forgetting:
            if same_text and forgetting_length in entry["perplexity"]:  # already measured on the same windows
                forgetting_ppl = entry["perplexity"][forgetting_length]
            else:
                forgetting_stream = token_stream(tokenize_documents(tokenizer, forgetting_documents), eos)
                forgetting_ppl = _perplexity(
                    loaded.model, forgetting_stream, [forgetting_length], settings, f"{label}: forgetting"
                )[forgetting_length]
            entry["forgetting"] = {"length": forgetting_length, "perplexity": forgetting_ppl}
        if settings.passkey_lengths:
            cells = passkey_accuracy(
                loaded.model,
                tokenizer,
                settings.passkey_lengths,
                depths=settings.passkey_depths,
                trials=settings.passkey_trials,
                seed=settings.seed,
                progress=settings.progress,
                description=f"{label}: passkey",
            )
            entry["passkey"] = cells
            entry["passkey_accuracy"] = {n: mean_accuracy(row) for n, row in cells.items()}
        if tasks:
            entry["ruler"] = ruler_accuracy(
                loaded.model,
                tokenizer,
                tasks,
                settings.ruler_lengths(),
                trials=settings.task_trials,
                seed=settings.seed,
                progress=settings.progress,
                description=f"{label}: ruler",
            )
            entry["ruler_mean"] = mean_over_tasks(entry["ruler"])
        results["models"][label] = entry
        del loaded
        gc.collect()

    if settings.forgetting:
        baseline = results["models"][labels[0]]["forgetting"]["perplexity"]
        for label in labels:
            forgetting = results["models"][label]["forgetting"]
            forgetting["change_vs_" + labels[0]] = forgetting["perplexity"] / baseline - 1.0
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results


def summary_of(results: dict[str, Any]) -> dict[str, Any]:
    """The short form model cards read: perplexity per model and length, passkey at the longest length."""
    summary: dict[str, Any] = {"perplexity": {}, "passkey": {}}
    for label, entry in results["models"].items():
        summary["perplexity"][label] = {str(n): v for n, v in entry["perplexity"].items()}
        if entry.get("passkey_accuracy"):
            longest = max(entry["passkey_accuracy"])
            summary["passkey"][label] = entry["passkey_accuracy"][longest]
    if not summary["passkey"]:
        del summary["passkey"]
    return summary


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plots_available() -> bool:
    """Whether matplotlib is installed (``pip install 'hf-longlora[eval]'``); without it only JSON is written."""
    return importlib.util.find_spec("matplotlib") is not None


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``eval.json``, ``eval_summary.json``, and with matplotlib ``perplexity.png``, ``passkey_<label>.png`` and
    ``ruler_<label>.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / RESULTS_FILE, "summary": out / SUMMARY_FILE}
    paths["results"].write_text(json.dumps(_jsonable(results), indent=2) + "\n", encoding="utf-8")
    paths["summary"].write_text(json.dumps(_jsonable(summary_of(results)), indent=2) + "\n", encoding="utf-8")
    if not plots_available():
        return paths
    from .plots import plot_passkey_heatmap, plot_perplexity, plot_ruler_heatmap

    models = results["models"]
    natives = {entry["original_context"] for entry in models.values()}
    paths["perplexity_plot"] = plot_perplexity(
        {label: entry["perplexity"] for label, entry in models.items()},
        out / "perplexity.png",
        native_context=natives.pop() if len(natives) == 1 else None,
    )
    for label, entry in models.items():
        if entry.get("passkey"):
            paths[f"passkey_{label}"] = plot_passkey_heatmap(
                entry["passkey"], out / f"passkey_{_safe(label)}.png", title=f"Passkey retrieval: {label}"
            )
        if entry.get("ruler"):
            paths[f"ruler_{label}"] = plot_ruler_heatmap(
                entry["ruler"], out / f"ruler_{_safe(label)}.png", title=f"RULER: {label}"
            )
    return paths


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: perplexity per length, forgetting and passkey accuracy per model; then, when RULER tasks
    ran, their accuracy per model, task and length (and the mean over the tasks)."""
    models = results["models"]
    lengths = sorted({n for entry in models.values() for n in entry["perplexity"]})
    passkey_lengths = sorted({n for entry in models.values() for n in entry.get("passkey_accuracy", {})})
    first = next(iter(models))
    with_forgetting = models[first].get("forgetting") is not None
    forgetting_header = (
        [f"forgetting ppl@{models[first]['forgetting']['length']}", f"vs {first}"] if with_forgetting else []
    )
    header = (
        ["model"]
        + [f"ppl@{n}" for n in lengths]
        + forgetting_header
        + [f"passkey@{n}" for n in passkey_lengths]
    )
    rows = [header]
    for label, entry in models.items():
        forgetting = entry.get("forgetting")
        rows.append(
            [label]
            + [f"{entry['perplexity'][n]:.2f}" if n in entry["perplexity"] else "" for n in lengths]
            + (
                [f"{forgetting['perplexity']:.2f}", f"{forgetting['change_vs_' + first]:+.1%}"]
                if forgetting
                else []
            )
            + [
                f"{entry['passkey_accuracy'][n]:.0%}" if n in entry.get("passkey_accuracy", {}) else ""
                for n in passkey_lengths
            ]
        )
    table = _aligned(rows)
    ruler = {label: entry["ruler"] for label, entry in models.items() if entry.get("ruler")}
    if ruler:
        ruler_lengths = sorted({n for cells in ruler.values() for row in cells.values() for n in row})
        rows = [["model", "RULER task"] + [f"@{n}" for n in ruler_lengths]]
        for label, cells in ruler.items():
            means = mean_over_tasks(cells)
            for task, row in [*cells.items(), ("mean", means)]:
                rows.append([label, task] + [f"{row[n]:.0%}" if n in row else "" for n in ruler_lengths])
        trials = results.get("protocol", {}).get("ruler_trials")
        note = f" ({trials} prompts per cell)" if trials else ""
        table += f"\n\nRULER accuracy, string_match_all{note}\n" + _aligned(rows)
    return table


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
