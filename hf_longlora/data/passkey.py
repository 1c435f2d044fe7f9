"""LongLoRA's passkey retrieval prompt (Mohtashami & Jaggi 2023, as used in the LongLoRA paper)."""

from __future__ import annotations

import random
from collections.abc import Sequence

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


def passkey_documents(
    tokenizer,
    count: int,
    min_length: int,
    max_length: int,
    *,
    haystacks: Sequence[str] = (),
    haystack_fraction: float = 0.5,
    seed: int = 0,
) -> list[str]:
    """``count`` passkey prompts followed by their answer (" N."), as training documents that teach retrieval.

    Each has a length drawn uniformly from ``[min_length, max_length]`` tokens and the needle at a uniform random
    depth. A share ``haystack_fraction`` of them hides the needle in a random slice of ``haystacks`` (prose) instead
    of the filler sentences, so retrieval is learned in general, not from one filler. The evaluation's keys are
    drawn from other seeds (:func:`hf_longlora.evaluation.passkey_accuracy`).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 16 <= min_length <= max_length:
        raise ValueError(f"need 16 <= min_length <= max_length, got {min_length} and {max_length}")
    if not 0.0 <= haystack_fraction <= 1.0:
        raise ValueError(f"haystack_fraction must be in [0, 1], got {haystack_fraction}")
    if haystack_fraction > 0 and not haystacks:
        raise ValueError("haystack_fraction > 0 needs haystacks (a list of prose texts)")
    rng = random.Random(seed)
    hay_ids = [tokenizer(h, add_special_tokens=False)["input_ids"] for h in haystacks]
    documents = []
    for _ in range(count):
        length = rng.randint(min_length, max_length)
        prompt, key = passkey_prompt(tokenizer, length, rng.random(), seed=rng.randrange(2**31))
        if hay_ids and rng.random() < haystack_fraction:
            needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
            fixed = len(tokenizer(TASK + needle + QUESTION, add_special_tokens=False)["input_ids"])
            ids = hay_ids[rng.randrange(len(hay_ids))]
            size = max(0, min(len(ids), length - fixed))
            start = rng.randrange(len(ids) - size + 1)
            hay = tokenizer.decode(ids[start : start + size])
            cut = round(len(hay) * rng.random())
            prompt = TASK + hay[:cut] + needle + hay[cut:] + QUESTION
        documents.append(f"{prompt} {key}.")
    return documents
