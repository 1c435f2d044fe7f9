"""RULER's synthetic tasks: the prompts (templates, length, where the answers sit, seeds), the metric, the evaluation
on Llamas whose greedy output is built into their weights, the settings and CLI, the training callback, the plots."""

from __future__ import annotations

import json
import re
import string
from types import SimpleNamespace

import pytest
import torch
from helpers import chain_model, tiny_config
from transformers import AutoTokenizer, LlamaForCausalLM

from hf_longlora.data import ruler as data
from hf_longlora.data.ruler import (
    CWE_WORDS,
    NEEDLE,
    NIAH_ANSWER_PREFIX,
    NIAH_ANSWER_PREFIX_ONE,
    NIAH_TEMPLATE,
    NIAH_TEMPLATE_ONE,
    NOISE,
    TASK_NAMES,
    generation_budget,
    ruler_prompt,
)
from hf_longlora.evaluation import EvalSettings, ModelSpec, evaluate_models, format_table, ruler_accuracy
from hf_longlora.evaluation.ruler import string_match_all, trial_seed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
# a length each task fits at with the tiny 400-token BPE (long words are many tokens): short and long, and for cwe
# both of RULER's settings (below and from 4096)
LENGTHS = {**{t: (600, 2000) for t in NIAH}, "vt": (1200, 2500), "cwe": (1500, 5200)}
SHORT = {task: lengths[0] for task, lengths in LENGTHS.items()}


class WordTokenizer:
    """Counts words: a stand-in tokenizer for properties that hold whatever the tokenizer."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0] * (len(text.split()) + int(add_special_tokens))}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


# -------------------------------------------------------------------------------------------------- prompts


def test_templates_are_rulers():
    """The texts are RULER's; the singular NIAH forms are what RULER's niah.py derives when one value is asked."""
    assert (
        NOISE == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    )
    assert NEEDLE.format(key="k", value="v") == "One of the special magic numbers for k is: v."
    plural = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX
    singular = (
        plural.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
    )
    assert singular.replace("numbers", "number") == NIAH_TEMPLATE_ONE + NIAH_ANSWER_PREFIX_ONE
    assert NIAH_TEMPLATE_ONE.endswith(
        "What is the special magic number for {query} mentioned in the provided text?"
    )
    assert NIAH_ANSWER_PREFIX_ONE == " The special magic number for {query} mentioned in the provided text is"
    assert data.VT_ANSWER_PREFIX.endswith(
        "variables are assgined the value {query}, they are: "
    )  # RULER's typo
    assert data.CWE_ANSWER_PREFIX == " Answer: The top 10 words that appear most often in the list are:"
    assert TASK_NAMES == ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")


def test_word_lists():
    """Keys are RULER-style adjective-noun pairs; no cwe word hides inside another or inside the task's text, so a
    substring hit means that very word."""
    assert len(CWE_WORDS) >= 400 and len(set(CWE_WORDS)) == len(CWE_WORDS)
    assert all(w.isalpha() and w.islower() for w in CWE_WORDS)
    assert not [(a, b) for a in CWE_WORDS for b in CWE_WORDS if a != b and a in b]
    text = (data.CWE_TEMPLATE + data.CWE_ANSWER_PREFIX).lower()
    assert not [w for w in CWE_WORDS if w in text]
    assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in data.KEYS) and len(data.KEYS) > 10_000


@pytest.mark.parametrize("task", TASK_NAMES)
def test_prompts_fill_the_length(tokenizer, task):
    """Prompt plus generation budget fit in the length (RULER's rule) and fill it up to one haystack unit."""
    if task == "cwe":  # one listed word: " 123. word"
        unit = max(len(tokenizer(f" 1234. {w}", add_special_tokens=False)["input_ids"]) for w in CWE_WORDS)
    else:  # one noise line
        unit = len(tokenizer(NOISE + "\n", add_special_tokens=False)["input_ids"]) + 2
    for length in LENGTHS[task]:
        prompt, answers = ruler_prompt(task, tokenizer, length, seed=5)
        used = n_tokens(tokenizer, prompt) + generation_budget(tokenizer, task, answers)
        assert length - unit < used <= length, (task, length, used, unit)


def test_cwe_beyond_the_word_list_keeps_rulers_ratio():
    """A list longer than all the words at RULER's counts: every count grows by the same factor (30:3 stays)."""
    words = WordTokenizer()
    for length, common_times, rare_times in [(3000, 6, 1), (60_000, 30, 3)]:
        prompt, answers = data.cwe_prompt(words, length, seed=1)
        used = n_tokens(words, prompt) + generation_budget(words, "cwe", answers)
        assert 0.97 * length < used <= length
        counts = _word_counts(_cwe_main_list(prompt))
        factor = counts[answers[0]] // common_times
        assert factor >= (1 if length < 4096 else 10)
        assert {counts[w] for w in answers} == {common_times * factor}
        assert {c for w, c in counts.items() if w not in answers} == {rare_times * factor}


def _question(prompt: str, pattern: str) -> str:
    return re.findall(pattern, prompt)[-1]


def _needles(prompt: str) -> list[tuple[str, str]]:
    return re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", prompt)


def _cwe_main_list(prompt: str) -> str:
    head, _, tail = prompt.rpartition("Memorize the ones that appear most often.\n")
    return tail.rpartition("\nQuestion: What are the 10 most common words")[0]


def _word_counts(listing: str) -> dict[str, int]:
    entries = re.findall(r"(\d+)\. ([a-z]+)", listing)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))  # numbered 1..N
    counts: dict[str, int] = {}
    for _, word in entries:
        counts[word] = counts.get(word, 0) + 1
    return counts


@pytest.mark.parametrize("task", NIAH)
def test_niah_answers_are_the_asked_needles(tokenizer, task):
    for seed in range(3):
        prompt, answers = ruler_prompt(task, tokenizer, SHORT[task], seed)
        needles = _needles(prompt)
        assert all(prompt.count(v) == 1 for v in answers) and len(set(answers)) == len(answers)
        assert all(re.fullmatch(r"[1-9]\d{6}", v) for v in answers)  # 7 digits, as RULER's numbers
        one = len(answers) == 1
        assert prompt.endswith(f"mentioned in the provided text {'is' if one else 'are'}")
        if task == "niah_multiquery":
            asked = _question(prompt, r"What are all the special magic numbers for (.+?) mentioned").split(
                ", "
            )
            asked = [k.removeprefix("and ") for k in asked]
        else:
            asked = [_question(prompt, r"special magic numbers? for (\S+) mentioned in the provided text\?")]
        expected = {
            "niah_single": (1, 1, 1),
            "niah_multikey": (4, 4, 1),
            "niah_multivalue": (4, 1, 4),
            "niah_multiquery": (4, 4, 4),
        }[task]
        assert (len(needles), len({k for k, _ in needles}), len(answers)) == expected
        asked_values = [v for key in asked for k, v in needles if k == key]
        assert sorted(asked_values) == sorted(answers)  # the values of the asked keys
        if task != "niah_multivalue":  # one value per key: the answers follow the keys' order in the question
            assert [dict(needles)[k] for k in asked] == answers
        assert prompt.index(needles[0][0]) > prompt.index("afterwards.\n")  # the needles are in the haystack


def test_vt_answers_are_the_chain_of_the_asked_value(tokenizer):
    for seed in range(3):
        prompt, answers = ruler_prompt("vt", tokenizer, SHORT["vt"], seed)
        example, _, main = prompt.rpartition("Memorize and track the chain(s) of variable assignment")
        value = _question(main, r"assigned the value (\d+) in the text above")
        assert main.endswith(f"5 variables are assgined the value {value}, they are: ")
        positions = [main.index(f"VAR {answers[0]} = {value}")]
        positions += [main.index(f"VAR {b} = VAR {a} ") for a, b in zip(answers, answers[1:], strict=False)]
        assert positions == sorted(positions) and len(answers) == 5 == len(set(answers))
        assert all(re.fullmatch(r"[A-Z]{5}", a) for a in answers)
        assert "Memorize and track" in example and not any(
            a in example for a in answers
        )  # a worked example first
        assert main.count(NOISE) > 3


def test_cwe_answers_are_the_most_common_words(tokenizer):
    for seed in range(3):
        prompt, answers = ruler_prompt("cwe", tokenizer, SHORT["cwe"], seed)
        counts = _word_counts(_cwe_main_list(prompt))
        assert len(answers) == 10 == len(set(answers))
        assert {counts[w] for w in answers} == {6}  # below 4096 tokens: 6 times, the rest once
        assert {c for w, c in counts.items() if w not in answers} == {1} and len(counts) > 10
        example = prompt.rpartition("Memorize the ones that appear most often.\n")[0]
        assert not any(f". {w} " in example for w in answers)  # the worked example has other words


@pytest.mark.parametrize("task", TASK_NAMES)
def test_seeds_decide_everything(tokenizer, task):
    """Same seed, same prompt; another seed, other answers; the answers of a seed do not depend on the tokenizer
    or on the length (every model evaluated gets the same questions)."""
    prompt, answers = ruler_prompt(task, tokenizer, SHORT[task], seed=11)
    assert ruler_prompt(task, tokenizer, SHORT[task], seed=11) == (prompt, answers)
    others = [ruler_prompt(task, tokenizer, SHORT[task], seed=s)[1] for s in (12, 13)]
    assert answers not in others and others[0] != others[1]
    assert ruler_prompt(task, WordTokenizer(), 5000, seed=11)[1] == answers


@pytest.mark.parametrize("task", TASK_NAMES)
def test_a_length_too_short_is_refused_with_the_minimum(tokenizer, task):
    with pytest.raises(ValueError, match=rf"{task}: a length of 100 tokens is too short") as error:
        ruler_prompt(task, tokenizer, 100, seed=0)
    minimum = int(re.search(r"use lengths >= (\d+)", str(error.value)).group(1))
    prompt, answers = ruler_prompt(task, tokenizer, minimum, seed=0)
    assert n_tokens(tokenizer, prompt) + generation_budget(tokenizer, task, answers) <= minimum


def test_unknown_task_names_the_argument_and_the_choices():
    with pytest.raises(
        ValueError, match=r"task: unknown RULER task 'qa'; choose from niah_single, .*cwe \(or all\)"
    ):
        ruler_prompt("qa", WordTokenizer(), 1000, 0)
    assert data.check_tasks(["all", "vt"]) == TASK_NAMES


# --------------------------------------------------------------------------------------------------- metric


def test_string_match_all():
    """RULER's metric: the fraction of the answers found in the output, case-insensitive; nothing else counts."""
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all(" 1234568.", ["1234567"]) == 0.0
    assert string_match_all("The answer: 123456", ["1234567"]) == 0.0  # a prefix of the answer is no hit
    assert string_match_all("abcde, FGHIJ", ["ABCDE", "fghij", "KLMNO", "PQRST"]) == 0.5
    assert string_match_all("1. apple 2. pear", ["Apple", "pear", "plum"]) == pytest.approx(2 / 3)
    assert string_match_all("", ["x"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference answer"):
        string_match_all("x", [])


# ------------------------------------------------------------------ models whose greedy output is known


def _answers(task: str, length: int, trial: int = 0) -> list[str]:
    """The answers of a trial of ruler_accuracy (they depend on the seed alone, not on the tokenizer)."""
    return ruler_prompt(task, WordTokenizer(), 20_000, trial_seed(task, length, trial))[1]


def _wrongs(answers: list[str]) -> list[str]:
    """One wrong answer per answer, of the same kind (a number, a variable name, a word), all distinct, none
    containing an answer or inside one."""
    out: list[str] = []
    for answer in answers:
        if answer.isdigit():
            candidates = (str(int(answer) + k) for k in range(1, 100))
        elif answer.isupper():
            candidates = (answer[:-1] + c for c in string.ascii_uppercase)
        else:
            candidates = iter(CWE_WORDS)
        out.append(next(c for c in candidates if c not in out and not any(c in a or a in c for a in answers)))
    return out


@pytest.fixture(scope="module")
def scripted(tiny_checkpoint, tmp_path_factory):
    """A tokenizer in which every answer of the tests (and a wrong one for each) is one token, and a tiny Llama
    checkpoint with that vocabulary; ``make(outputs)`` is a model whose greedy output after a RULER prompt is
    ``outputs`` (these tokens) and then EOS."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    cells = [(task, SHORT[task], trial) for task in TASK_NAMES for trial in (0, 1)] + [
        ("niah_single", 1200, 0)
    ]
    words = {w for cell in cells for answers in [_answers(*cell)] for w in answers + _wrongs(answers)}
    tokenizer.add_tokens(sorted(words))
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("scripted") / "llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    # every prompt's last token (each task's answer prefix ends the same way whatever the seed)
    last = {
        task: tokenizer(ruler_prompt(task, tokenizer, SHORT[task], 0)[0])["input_ids"][-1]
        for task in TASK_NAMES
    }

    def make(task: str, outputs: list[str]):
        chain = [last[task], *tokenizer.convert_tokens_to_ids(outputs), tokenizer.eos_token_id]
        return chain_model(path, tokenizer, chain)

    return SimpleNamespace(tokenizer=tokenizer, path=path, make=make)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_accuracy_of_models_that_answer_right_wrong_or_in_part(scripted, task):
    """A model that writes the answers scores 1, one that writes wrong ones 0, one that writes half of them 0.5
    (multi-answer tasks). A scorer that counts any output as a hit, or a generator that drops the needles, fails."""
    length, tokenizer = SHORT[task], scripted.tokenizer
    answers = _answers(task, length)

    def score(outputs):
        cells = ruler_accuracy(
            scripted.make(task, outputs), tokenizer, [task], [length], trials=1, progress=False
        )
        assert set(cells) == {task} and set(cells[task]) == {length}
        return cells[task][length]

    assert score(answers) == 1.0
    assert score(_wrongs(answers)) == 0.0
    if len(answers) > 1:
        half = len(answers) // 2
        assert score(answers[:half] + _wrongs(answers)[half:]) == pytest.approx(half / len(answers))


def test_accuracy_is_the_mean_over_trials_and_restores_train_mode(scripted):
    """Each trial has its own prompt: the answer of trial 0 scores 1/2 over two trials, trial 1's too."""
    length, tokenizer = SHORT["niah_single"], scripted.tokenizer
    for trial in (0, 1):
        model = scripted.make("niah_single", _answers("niah_single", length, trial)).train()
        cells = ruler_accuracy(model, tokenizer, ["niah_single"], [length], trials=2, progress=False)
        assert cells == {"niah_single": {length: 0.5}} and model.training
    with pytest.raises(ValueError, match="trials must be an integer >= 1"):
        ruler_accuracy(model, tokenizer, ["vt"], [length], trials=0, progress=False)
    with pytest.raises(ValueError, match="lengths must be a non-empty list of integers >= 16"):
        ruler_accuracy(model, tokenizer, ["vt"], [8], progress=False)


# ----------------------------------------------------------------------------------- settings, runs, CLI


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks=["niah"]), r"tasks: unknown RULER task 'niah'; choose from niah_single, niah_multikey"),
        (
            dict(task_lengths=[1024]),
            r"task_lengths is set but tasks is empty: name the RULER tasks to run \(niah",
        ),
        (dict(tasks=["vt"], task_lengths=[8]), r"task_lengths must be integers >= 16 tokens, got \[8\]"),
        (dict(tasks=["vt"], task_trials=0), r"task_trials must be an integer >= 1, got 0"),
    ],
)
def test_bad_ruler_settings_fail_before_any_model_loads(kwargs, match, no_loading, tmp_path):
    with pytest.raises(ValueError, match=match):
        evaluate_models([ModelSpec(str(tmp_path / "missing"))], ["x"], EvalSettings([64], **kwargs))


def test_a_length_too_short_for_the_tokenizer_fails_before_any_model_loads(tiny_checkpoint, no_loading):
    settings = EvalSettings([64], tasks=["niah_single", "cwe"], task_lengths=[400, 4096], progress=False)
    with pytest.raises(ValueError, match=r"cwe: a length of 400 tokens is too short .* use lengths >= \d+"):
        evaluate_models([ModelSpec(str(tiny_checkpoint))], ["word " * 400], settings)


def test_models_side_by_side_with_ruler_tasks(scripted, tmp_path):
    """evaluate_models: accuracy per model, task and length in eval.json, the table and a heatmap per model."""
    length = 1200
    right = tmp_path / "right"
    scripted.make("niah_single", _answers("niah_single", length)).save_pretrained(right)
    scripted.tokenizer.save_pretrained(right)
    settings = EvalSettings(
        [64], max_windows=1, forgetting=False, tasks=["niah_single", "vt"], task_lengths=[length, 1500],
        task_trials=1, progress=False,
    )  # fmt: skip
    specs = [ModelSpec(str(right), label="right"), ModelSpec(str(scripted.path), label="random")]
    results = evaluate_models(specs, ["word " * 400], settings, out_dir=tmp_path / "eval")
    ruler = results["models"]["right"]["ruler"]
    assert ruler == {"niah_single": {length: 1.0, 1500: 0.0}, "vt": {length: 0.0, 1500: 0.0}}
    assert set(results["models"]["random"]["ruler"]) == {"niah_single", "vt"}
    assert (
        results["protocol"]["ruler_trials"] == 1 and results["protocol"]["ruler_metric"] == "string_match_all"
    )
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["models"]["right"]["ruler"]["niah_single"][str(length)] == 1.0
    assert saved["models"]["right"]["ruler_mean"] == {str(length): 0.5, "1500": 0.0}
    for png in ("ruler_right.png", "ruler_random.png", "perplexity.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:8] == PNG_MAGIC, png
    table = format_table(results)
    assert "RULER accuracy, string_match_all (1 prompts per cell)" in table
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in table.splitlines()}
    assert rows[("right", "niah_single")] == ["100%", "0%"] and rows[("right", "mean")] == ["50%", "0%"]
    assert ("random", "vt") in rows


def test_cli_eval_tasks(tiny_checkpoint, tmp_path, capsys):
    from hf_longlora import cli

    out = tmp_path / "eval"
    base = ["eval", "--model", str(tiny_checkpoint), "--data", "stdlib", "--max-documents", "1", "--lengths", "64",
            "--max-windows", "1", "--no-forgetting", "--no-progress", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli.main([*base, "--tasks", "niah_single", "passkey"])
    assert exit_.value.code == 2 and "argument --tasks: invalid choice: 'passkey'" in capsys.readouterr().err
    assert cli.main([*base, "--task-lengths", "600"]) == 2
    assert "task_lengths is set but tasks is empty" in capsys.readouterr().err
    assert not out.exists()
    code = cli.main([*base, "--tasks", "niah_single", "--task-lengths", "600", "--task-trials", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "RULER accuracy" in printed and "niah_single" in printed
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved["models"]["tiny"]["ruler"]) == {"niah_single"}
    assert 0.0 <= saved["models"]["tiny"]["ruler"]["niah_single"]["600"] <= 1.0


def test_cli_task_choices_are_the_tasks():
    from hf_longlora import cli

    action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["eval"]._actions
                  if a.dest == "tasks")  # fmt: skip
    assert tuple(action.choices) == (*TASK_NAMES, "all")


# ----------------------------------------------------------------------------------------------- callback


def test_callback_logs_ruler_metrics(scripted):
    from transformers import TrainerControl

    from hf_longlora.training import LongLoraArguments
    from hf_longlora.training.callbacks import LongContextEvalCallback, build_callbacks

    length, tokenizer = 1200, scripted.tokenizer
    model = scripted.make("niah_single", _answers("niah_single", length)).train()
    callback = LongContextEvalCallback([], [], tokenizer=tokenizer, ruler_tasks=["niah_single", "vt"],
                                       ruler_lengths=[length, 1500], eval_steps=2)  # fmt: skip
    state = SimpleNamespace(global_step=2, max_steps=4, log_history=[{"step": 2, "loss": 1.0}])
    control = TrainerControl()
    callback.on_step_end(None, state, control, model=model)
    assert control.should_log and model.training
    logs = {"loss": 1.0}
    callback.on_log(None, state, control, logs=logs)
    assert logs["eval_ruler_niah_single_" + str(length)] == 1.0 and logs["eval_ruler_niah_single_1500"] == 0.0
    assert {"eval_ruler_vt_" + str(length), "eval_ruler_vt_1500"} <= set(logs)
    assert state.log_history[-1]["eval_ruler_niah_single_" + str(length)] == 1.0

    with pytest.raises(ValueError, match="ruler_tasks needs a tokenizer"):
        LongContextEvalCallback([], [], ruler_tasks=["vt"], ruler_lengths=[1000])
    with pytest.raises(ValueError, match="ruler_tasks: unknown RULER task 'nope'"):
        LongContextEvalCallback([], [], tokenizer=tokenizer, ruler_tasks=["nope"], ruler_lengths=[1000])
    with pytest.raises(ValueError, match="ruler_lengths is set but ruler_tasks is empty"):
        LongContextEvalCallback([], [], tokenizer=tokenizer, ruler_lengths=[1000])
    with pytest.raises(ValueError, match=r"ruler_lengths \(default: lengths\) must be a non-empty list"):
        LongContextEvalCallback([], [], tokenizer=tokenizer, ruler_tasks=["vt"])

    args = LongLoraArguments(ruler_tasks="vt", ruler_lengths=1000)  # one value in a YAML: a one-item list
    assert args.ruler_tasks == ["vt"] and args.ruler_lengths == [1000]
    (built,) = [c for c in build_callbacks(args, tokenizer, None) if isinstance(c, LongContextEvalCallback)]
    assert built.ruler_tasks == ("vt",) and built.ruler_lengths == [1000]
    with pytest.raises(ValueError, match="ruler_tasks: unknown RULER task 'ppl'"):
        LongLoraArguments(ruler_tasks=["ppl"])
    with pytest.raises(ValueError, match="ruler_lengths is set but ruler_tasks is empty"):
        LongLoraArguments(ruler_lengths=[1000])


# -------------------------------------------------------------------------------------------------- plots


def _contrast(a: float, b: float) -> float:
    return (max(a, b) + 0.05) / (min(a, b) + 0.05)


def _luminance(rgba) -> float:
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _check_cell_texts(fig, expected: dict[str, str]):
    """Every cell's label has the better-contrasting of black and white on its cell's colour."""
    from matplotlib.colors import to_rgba

    ax = fig.axes[0]
    image = ax.images[0]
    grid = image.get_array()
    texts = ax.texts
    assert len(texts) == grid.size
    for text in texts:
        col, row = (round(v) for v in text.get_position())
        value = grid[row, col]
        cell = _luminance(image.cmap(image.norm(value)))
        color = _luminance(to_rgba(text.get_color()))
        other = 1.0 - color  # black <-> white
        assert _contrast(cell, color) >= _contrast(cell, other), (text.get_text(), text.get_color())
        assert text.get_text() == f"{value:.0%}"
        if text.get_text() in expected:
            assert text.get_color() == expected[text.get_text()]


def test_ruler_heatmap_labels_contrast_with_their_cells(tmp_path):
    pytest.importorskip("matplotlib")
    from hf_longlora.evaluation.plots import plot_ruler_heatmap, ruler_heatmap_figure

    cells = {
        "niah_single": {1024: 1.0, 4096: 0.5},
        "vt": {1024: 0.0, 4096: 0.25},
        "cwe": {1024: 0.75, 4096: 0.1},
    }
    path = plot_ruler_heatmap(cells, tmp_path / "ruler.png", title="RULER")
    assert path.read_bytes()[:8] == PNG_MAGIC
    fig = ruler_heatmap_figure(cells, title="RULER")
    try:
        assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["niah_single", "vt", "cwe"]
        # RdYlGn: dark red at 0 and dark green at 1 take white labels, the light yellow middle black
        _check_cell_texts(fig, {"0%": "white", "100%": "white", "50%": "black"})
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_passkey_heatmap_labels_contrast_with_their_cells():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from hf_longlora.evaluation.plots import passkey_heatmap_figure

    fig = passkey_heatmap_figure({256: {0.0: 0.0, 1.0: 1.0}, 512: {0.0: 0.5, 1.0: 0.5}}, title="passkey")
    try:
        _check_cell_texts(fig, {"0%": "white", "100%": "white", "50%": "black"})
    finally:
        plt.close(fig)


def test_perplexity_lines_that_coincide_stay_visible():
    """Every line has its own marker and dash pattern; each later one is drawn above, thinner and with smaller
    markers, so 'merged' on top of an identical 'after' leaves 'after' showing around it."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from hf_longlora.evaluation.plots import perplexity_figure

    after = {256: 25.9, 512: 24.0, 1024: 25.4}
    fig = perplexity_figure({"base": {256: 25.1, 512: 23.6, 1024: 25.3}, "before": {256: 34.2, 512: 31.7,
                             1024: 32.9}, "after": after, "merged": dict(after)}, native_context=256)  # fmt: skip
    try:
        lines = [
            line
            for line in fig.axes[0].get_lines()
            if line.get_label() in ("base", "before", "after", "merged")
        ]
        assert [line.get_label() for line in lines] == ["base", "before", "after", "merged"]
        assert len({line.get_marker() for line in lines}) == 4
        assert len({line.get_linestyle() for line in lines}) == 4
        for below, above in zip(lines, lines[1:], strict=False):
            assert above.get_zorder() > below.get_zorder()
            assert above.get_markersize() < below.get_markersize()
            assert above.get_linewidth() < below.get_linewidth()
        after_line, merged_line = lines[2], lines[3]
        assert list(after_line.get_ydata()) == list(merged_line.get_ydata())  # they coincide
        assert {after_line.get_markerfacecolor(), merged_line.get_markerfacecolor()} != {"none"}
    finally:
        plt.close(fig)
