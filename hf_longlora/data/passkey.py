"""LongLoRA's passkey retrieval prompt (Mohtashami & Jaggi 2023, as used in the LongLoRA paper)."""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASK = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there. "
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[str, str]:
    """A prompt of about ``length`` tokens with the passkey at relative ``depth`` in [0, 1]; returns (prompt, key).

    The key is a random integer in 1..50000 drawn from ``seed``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(seed).randint(1, 50000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(TASK + needle + QUESTION, add_special_tokens=False)["input_ids"])
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    n_filler = max(0, (length - fixed) // max(1, per_filler))
    before = round(n_filler * depth)
    prompt = TASK + FILLER * before + needle + FILLER * (n_filler - before) + QUESTION
    return prompt, key
