"""Passkey retrieval (LongLoRA's protocol, from Mohtashami & Jaggi 2023), full attention, greedy decoding.

A prompt of about ``length`` tokens hides "The pass key is N. Remember it. N is the pass key." at a relative
``depth`` inside filler text ("The grass is green. The sky is blue. ...") and ends with "What is the pass key?
The pass key is". N is a random integer in 1..50000. A trial counts as retrieved when the first number the model
generates is exactly N. Accuracy is reported per (length, depth) cell and per length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..data.passkey import passkey_prompt

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@torch.no_grad()
def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer,
    lengths: Sequence[int],
    *,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 2,
    seed: int = 0,
    progress: bool = True,
    description: str = "passkey",
) -> dict[int, dict[float, float]]:
    """Retrieval accuracy ``{length: {depth: accuracy}}`` over ``trials`` keys per cell (seeded)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad or not depths:
        raise ValueError(f"depths must be a non-empty list of values in [0, 1], got {list(depths)}")
    if any(n < 16 for n in lengths):
        raise ValueError(f"passkey lengths must be >= 16 tokens, got {list(lengths)}")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: dict[int, dict[float, float]] = {}
    try:
        with tqdm(
            total=len(lengths) * len(depths) * trials, desc=description, unit="prompt", disable=not progress
        ) as bar:
            for n in lengths:
                results[n] = {}
                for d_index, depth in enumerate(depths):
                    hits = 0
                    for trial in range(trials):
                        # one key per (length, depth, trial), the same for every model evaluated
                        prompt, key = passkey_prompt(
                            tokenizer, n, depth, seed=seed + 1_000_003 * n + 1009 * d_index + trial
                        )
                        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
                        budget = len(tokenizer(" " + key, add_special_tokens=False)["input_ids"]) + 2
                        out = model.generate(
                            input_ids=ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=budget,
                            do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                        )
                        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                        hits += first_number(answer) == key
                        bar.update(1)
                    results[n][depth] = hits / trials
    finally:
        model.train(was_training)
    return results


def mean_accuracy(cells: dict[float, float]) -> float:
    """Accuracy over all depths of one length."""
    return sum(cells.values()) / len(cells)
