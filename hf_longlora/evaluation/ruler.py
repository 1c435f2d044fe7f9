"""RULER's synthetic tasks (NIAH variants, variable tracking, common-word extraction), full attention, greedy.

Each trial is one prompt of :mod:`hf_longlora.data.ruler` (its length is the whole sequence: prompt plus
generation budget, as in RULER), decoded greedily for :func:`~hf_longlora.data.ruler.generation_budget` new
tokens and scored with RULER's ``string_match_all``: the fraction of the reference answers found in the output,
case-insensitive. Accuracy per (task, length) is the mean over ``trials`` prompts, in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.ruler import TASK_NAMES, check_tasks, generation_budget, ruler_prompt

MIN_LENGTH = 16


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's metric for one output: the fraction of ``answers`` that occur in it, case-insensitive."""
    if not answers:
        raise ValueError("string_match_all needs at least one reference answer")
    text = prediction.lower()  # RULER's clean-up of control characters cannot change a match
    return sum(answer.lower() in text for answer in answers) / len(answers)


def trial_seed(task: str, length: int, trial: int, seed: int = 0) -> int:
    """The prompt seed of one trial: the same for every model (and for the training callback) given ``seed``."""
    return seed + 1_000_003 * length + 7919 * TASK_NAMES.index(task) + trial


def check_lengths(lengths: Sequence[int], argument: str = "lengths") -> list[int]:
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < MIN_LENGTH for n in lengths):
        raise ValueError(
            f"{argument} must be a non-empty list of integers >= {MIN_LENGTH}, got {list(lengths)}"
        )
    return list(lengths)


def greedy_answer(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy continuation of ``prompt`` (special tokens dropped)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def ruler_accuracy(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    *,
    trials: int = 2,
    seed: int = 0,
    progress: bool = True,
    description: str = "ruler",
) -> dict[str, dict[int, float]]:
    """RULER accuracy ``{task: {length: accuracy}}`` over ``trials`` seeded prompts per cell.

    ``tasks``: names of :data:`hf_longlora.data.ruler.RULER_TASKS` (``"all"`` for every one). The model is put in
    eval mode (full attention) and restored afterwards.
    """
    tasks = check_tasks(tasks, "tasks")
    lengths = check_lengths(lengths)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    results: dict[str, dict[int, float]] = {}
    try:
        with tqdm(
            total=len(tasks) * len(lengths) * trials, desc=description, unit="prompt", disable=not progress
        ) as bar:
            for task in tasks:
                results[task] = {}
                for n in lengths:
                    scores = []
                    for trial in range(trials):
                        prompt, answers = ruler_prompt(task, tokenizer, n, trial_seed(task, n, trial, seed))
                        budget = generation_budget(tokenizer, task, answers)
                        scores.append(
                            string_match_all(greedy_answer(model, tokenizer, prompt, budget), answers)
                        )
                        bar.update(1)
                    results[task][n] = sum(scores) / trials
    finally:
        model.train(was_training)
    return results


def mean_over_tasks(cells: dict[str, dict[int, float]]) -> dict[int, float]:
    """``{length: mean accuracy over the tasks}`` (RULER's per-length average)."""
    lengths = sorted({n for row in cells.values() for n in row})
    return {
        n: sum(row[n] for row in cells.values()) / len(cells)
        for n in lengths
        if all(n in r for r in cells.values())
    }
