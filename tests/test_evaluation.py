"""Evaluation: the window protocol, perplexity against transformers' own loss, passkey, models side by side, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import chain_model, make_tiny_checkpoint, tiny_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_longlora import LongLoraConfig, extend_context, get_longlora_model
from hf_longlora.attention.backend import ATTENTION_CALLS
from hf_longlora.evaluation import (
    EvalSettings,
    ModelSpec,
    evaluate_models,
    format_table,
    passkey_accuracy,
    perplexity,
    token_stream,
    window_starts,
)
from hf_longlora.evaluation.passkey import first_number

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ window protocol


def test_sliding_windows_start_every_stride_and_stay_inside_the_stream():
    assert window_starts(1000, 512, stride=256) == [0, 256]
    assert window_starts(1024, 512, stride=256) == [0, 256, 512]
    assert window_starts(1024, 512, mode="non_overlapping") == [0, 512]
    assert window_starts(512, 512) == [0]


def test_max_windows_is_an_even_subset_with_both_ends():
    full = window_starts(10_000, 100, stride=10)
    subset = window_starts(10_000, 100, stride=10, max_windows=5)
    assert len(subset) == 5 and set(subset) <= set(full)
    assert subset[0] == full[0] and subset[-1] == full[-1]
    gaps = [b - a for a, b in zip(subset, subset[1:], strict=False)]
    assert max(gaps) - min(gaps) <= 10  # evenly spaced, up to one stride of rounding


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_tokens=100, length=200), "fewer than one window of 200"),
        (dict(n_tokens=100, length=10, mode="strided"), "mode must be one of"),
        (dict(n_tokens=100, length=10, stride=0), "stride must be >= 1"),
        (dict(n_tokens=100, length=1), "context lengths must be >= 2"),
        (dict(n_tokens=100, length=10, max_windows=0), "max_windows must be >= 1"),
    ],
)
def test_bad_window_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        window_starts(**kwargs)


def test_token_stream_joins_documents_with_eos():
    assert token_stream([[1, 2], [3]], eos_token_id=0) == [1, 2, 0, 3, 0]
    assert token_stream([[1, 2], [3]], eos_token_id=None) == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ perplexity


def _tiny_model(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(**overrides)).float()


def _reference_perplexity(model, stream, length, starts):
    """Independent of our loss code: transformers' own loss per window (mean over its L-1 predictions)."""
    model.eval()
    with torch.no_grad():
        losses = [
            model(
                input_ids=torch.tensor([stream[s : s + length]]),
                labels=torch.tensor([stream[s : s + length]]),
            )
            .loss.double()
            .item()
            for s in starts
        ]
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize(
    "mode, batch_size, logits_path",
    [("sliding", 1, False), ("sliding", 3, False), ("non_overlapping", 2, False), ("sliding", 3, True)],
)
def test_perplexity_matches_transformers_loss_per_window(mode, batch_size, logits_path):
    from hf_longlora.training.loss import supports_chunked_loss

    model = _tiny_model()
    if logits_path:  # a logit transform in the config: the plain logits path (Llama itself ignores the knob)
        model.config.final_logit_softcapping = 30.0
    assert supports_chunked_loss(model) is not logits_path
    stream = torch.randint(0, 128, (1500,), generator=torch.Generator().manual_seed(1)).tolist()
    result = perplexity(
        model, stream, [64, 256], stride=200, mode=mode, batch_size=batch_size, progress=False
    )
    for n in (64, 256):
        starts = window_starts(len(stream), n, stride=200, mode=mode)
        assert result[n] == pytest.approx(_reference_perplexity(model, stream, n, starts), rel=1e-5)


def test_perplexity_uses_full_attention_and_restores_train_mode():
    model = _tiny_model(s2_group_size_ratio=0.25)
    model.set_attn_implementation("s2_attention")
    model.train()
    stream = list(range(100)) * 6
    before = dict(ATTENTION_CALLS)
    perplexity(model, stream, [128], max_windows=2, progress=False)
    assert ATTENTION_CALLS["s2"] == before["s2"]
    assert ATTENTION_CALLS["full"] - before["full"] == 2 * model.config.num_hidden_layers
    assert model.training


# ------------------------------------------------------------------------------------------------- passkey


def test_first_number():
    assert first_number(" 12345. Remember") == "12345"
    assert first_number("the key is 7 or 8") == "7"
    assert first_number("none") is None


def test_passkey_scores_hits_and_misses_of_known_generations(tiny_checkpoint):
    """passkey_accuracy on real models whose greedy output is known: one generates the key of cell (depth 0, trial
    0) and so scores 1/2 there and 0 at depth 1 (other keys); a key with its last digit changed, or followed by one
    more digit, scores 0 everywhere. A scorer that always says hit, or always miss, or accepts a prefix fails."""
    from transformers import AutoTokenizer

    from hf_longlora.data.passkey import QUESTION, passkey_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    length, depths = 64, [0.0, 1.0]

    def keys(seed):  # the key of each (depth, trial) cell, seeded as passkey_accuracy documents it
        return [
            [
                passkey_prompt(tokenizer, length, d, seed=seed + 1_000_003 * length + 1009 * i + t)[1]
                for t in (0, 1)
            ]
            for i, d in enumerate(depths)
        ]

    def tokens(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    last = tokens(QUESTION)[-1]  # every prompt ends with the question
    period = tokens(".")[-1]

    def chain_for(answer):
        chain = [last, *tokens(" " + answer), period]
        return chain if len(set(chain)) == len(chain) else None

    for seed in range(100):  # a seed whose first key's tokens are distinct, and four distinct keys
        cells = keys(seed)
        key = cells[0][0]
        wrong = key[:-1] + ("1" if key[-1] != "1" else "2")
        longer = key + ("3" if key[-1] != "3" else "4")
        flat = [k for row in cells for k in row]
        answers = (key, wrong, longer, cells[1][1])
        if len(set(flat)) == 4 and all(chain_for(a) for a in answers) and wrong not in flat:
            break
    else:
        pytest.fail("no seed gives distinct keys")

    def score(answer):
        model = chain_model(tiny_checkpoint, tokenizer, chain_for(answer))
        return passkey_accuracy(
            model, tokenizer, [length], depths=depths, trials=2, seed=seed, progress=False
        )

    assert score(key) == {length: {0.0: 0.5, 1.0: 0.0}}
    assert score(wrong) == {length: {0.0: 0.0, 1.0: 0.0}}
    assert score(longer) == {length: {0.0: 0.0, 1.0: 0.0}}
    assert score(cells[1][1]) == {length: {0.0: 0.0, 1.0: 0.5}}


@pytest.mark.slow
def test_passkey_is_retrieved_by_a_real_pretrained_model():
    """SmolLM2-135M-Instruct retrieves the key from short prompts: the scoring can succeed, not only fail."""
    from transformers import AutoTokenizer

    from hf_longlora.adapters.smollm2 import smollm2_checkpoint

    path = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(path)
    cells = passkey_accuracy(model, tokenizer, [256], depths=[0.0, 0.5], trials=1, progress=False)
    assert cells == {256: {0.0: 1.0, 0.5: 1.0}}


def test_passkey_cells_are_deterministic_and_bad_settings_named(tmp_path):
    from transformers import AutoTokenizer

    path = make_tiny_checkpoint(tmp_path / "m", max_position_embeddings=512)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    first = passkey_accuracy(model, tokenizer, [96, 160], depths=[0.0, 1.0], trials=2, progress=False)
    assert set(first) == {96, 160} and all(set(row) == {0.0, 1.0} for row in first.values())
    assert all(v in (0.0, 0.5, 1.0) for row in first.values() for v in row.values())
    assert passkey_accuracy(model, tokenizer, [96, 160], depths=[0.0, 1.0], trials=2, progress=False) == first
    with pytest.raises(ValueError, match="depths must be"):
        passkey_accuracy(model, tokenizer, [96], depths=[1.5], progress=False)
    with pytest.raises(ValueError, match="trials must be >= 1"):
        passkey_accuracy(model, tokenizer, [96], trials=0, progress=False)


# ------------------------------------------------------------------------------------ models side by side


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = make_tiny_checkpoint(root / "base", max_position_embeddings=64)
    model = AutoModelForCausalLM.from_pretrained(base)
    extend_context(model, 256)
    peft_model = get_longlora_model(model, LongLoraConfig())
    with torch.no_grad():  # a trained-looking adapter: non-zero LoRA B and a changed norm
        for name, param in peft_model.named_parameters():
            if param.requires_grad and ("lora_B" in name or "norm" in name):
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(root / "adapter")
    return base, root / "adapter", peft_model


def _documents():
    from hf_longlora.data import pydoc_topics_text

    text = pydoc_topics_text()
    return [text[:6000], text[6000:12000]]


def test_models_side_by_side_write_json_summary_and_plots(tmp_path, base_and_adapter):
    base, adapter, peft_model = base_and_adapter
    settings = EvalSettings(
        lengths=[64, 128, 256],
        max_windows=3,
        passkey_lengths=[128],
        passkey_depths=[0.0, 1.0],
        passkey_trials=1,
        progress=False,
    )
    specs = [
        ModelSpec(str(base), label="base"),
        ModelSpec(str(base), label="before", context_length=256),
        ModelSpec(str(adapter), label="after"),
    ]
    results = evaluate_models(specs, _documents(), settings, out_dir=tmp_path)
    models = results["models"]
    assert list(models) == ["base", "before", "after"]
    assert [models[k]["kind"] for k in models] == ["base", "base", "adapter"]
    assert models["before"]["context"] == models["after"]["context"] == 256
    assert models["base"]["context"] == models["base"]["original_context"] == 64

    # the adapter row is the adapter model's own perplexity on the same windows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    stream = token_stream(
        [tokenizer(d, add_special_tokens=False)["input_ids"] for d in _documents()], tokenizer.eos_token_id
    )
    starts = window_starts(len(stream), 256, max_windows=3)
    assert models["after"]["perplexity"][256] == pytest.approx(
        _reference_perplexity(peft_model, stream, 256, starts), rel=1e-5
    )
    # forgetting: each model at the base's original context, relative to the first model
    assert models["after"]["forgetting"]["length"] == 64
    assert models["base"]["forgetting"]["change_vs_base"] == 0.0
    expected = models["after"]["forgetting"]["perplexity"] / models["base"]["forgetting"]["perplexity"] - 1
    assert models["after"]["forgetting"]["change_vs_base"] == pytest.approx(expected)
    assert models["after"]["forgetting"]["perplexity"] == pytest.approx(models["after"]["perplexity"][64])

    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["models"]["after"]["perplexity"]["256"] == pytest.approx(models["after"]["perplexity"][256])
    assert saved["protocol"]["stride"] == 256 and saved["protocol"]["mode"] == "sliding"
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert set(summary["perplexity"]) == {"base", "before", "after"}
    assert set(summary["passkey"]) == {"base", "before", "after"}
    for png in ("perplexity.png", "passkey_base.png", "passkey_before.png", "passkey_after.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC, png

    table = format_table(results).splitlines()
    assert table[0].split()[:4] == ["model", "ppl@64", "ppl@128", "ppl@256"]
    assert len(table) == 2 + 3


def test_bad_settings_fail_before_any_model_loads(tmp_path, base_and_adapter):
    base, adapter, _ = base_and_adapter
    missing = str(tmp_path / "not-a-model")
    with pytest.raises(ValueError, match="labels must be unique"):
        evaluate_models(
            [ModelSpec(missing, label="a"), ModelSpec(missing, label="a")], ["x"], EvalSettings([64])
        )
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate_models([ModelSpec(missing)], ["x"], EvalSettings([64], mode="strided"))
    with pytest.raises(ValueError, match="passkey_lengths must be >= 16"):
        evaluate_models([ModelSpec(missing)], ["x"], EvalSettings([64], passkey_lengths=[8]))
    with pytest.raises(ValueError, match="fewer than one window of 100000"):
        evaluate_models([ModelSpec(str(base))], _documents(), EvalSettings([100_000], progress=False))


@pytest.mark.slow
def test_cli_eval_compares_base_and_adapter(tmp_path, base_and_adapter):
    base, adapter, _ = base_and_adapter
    data = tmp_path / "heldout.txt"
    data.write_text("\n".join(_documents()))
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        "-m",
        "hf_longlora.cli",
        "eval",
        "--model",
        f"base={base}",
        "--model",
        f"pi={base}",
        "--context-length",  # applies to the --model before it: pi, not base
        "256",
        "--model",
        f"longlora={adapter}",
    ]
    cmd += ["--data", str(data), "--lengths", "64", "256", "--max-windows", "2"]
    cmd += ["--passkey-lengths", "128", "--passkey-depths", "0.5", "--passkey-trials", "1", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ppl@64" in result.stdout and "passkey@128" in result.stdout
    saved = json.loads((out / "eval.json").read_text())
    assert saved["models"]["pi"]["context"] == 256  # --context-length extended the plain model before it
    assert saved["models"]["base"]["context"] == 64  # and only that one: two different models, two rows
    assert saved["models"]["base"]["perplexity"] != saved["models"]["pi"]["perplexity"]
    assert saved["models"]["longlora"]["kind"] == "adapter"
    assert (out / "perplexity.png").read_bytes()[:8] == PNG_MAGIC

    bad = subprocess.run(
        [sys.executable, "-m", "hf_longlora.cli", "eval", "--model", str(base), "--data", str(data)]
        + ["--lengths", "64", "--stride", "0", "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "stride must be >= 1" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_eval_context_length_belongs_to_the_model_before_it(tmp_path):
    """--context-length / --rope-method attach to the --model before them; misplaced, they are refused clearly."""
    from hf_longlora import cli

    parser = cli.build_parser()
    args = parser.parse_args(
        ["eval", "--model", "a=m", "--model", "b=m", "--context-length", "256", "--rope-method", "yarn",
         "--rope-options", '{"beta_fast": 2, "beta_slow": 1}',
         "--model", "c=m", "--context-length", "512", "--data", "stdlib", "--lengths", "64"]
    )  # fmt: skip
    specs = [cli._model_spec(m, None) for m in args.model]
    assert [(s.label, s.context_length, s.rope_method, s.rope_options) for s in specs] == [
        ("a", None, "linear", None),
        ("b", 256, "yarn", {"beta_fast": 2, "beta_slow": 1}),
        ("c", 512, "linear", None),
    ]
    for bad, message in (
        ({"spec": "m", "context_length": None, "rope_method": "yarn", "rope_options": {"beta_fast": 2}},
         "needs --context-length"),
        ({"spec": "m", "context_length": 256, "rope_method": None, "rope_options": {"beta_fast": 2}},
         r"\['beta_fast'\] not allowed with rope_method='linear'"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            cli._model_spec(bad, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--rope-options", "[1]", "--data", "x", "--lengths", "64"])
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["eval", "--context-length", "256", "--model", "m", "--data", "x", "--lengths", "64"]
        )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    entry = {"spec": f"ll={adapter}", "context_length": 256, "rope_method": None, "rope_options": None}
    with pytest.raises(ValueError, match="an adapter restores the context it was trained at"):
        cli._model_spec(entry, None)


def test_forgetting_off_warnings_and_no_matplotlib(tmp_path, base_and_adapter, monkeypatch, caplog, capsys):
    """forgetting=False skips the window (no column, no extra pass); lengths far beyond a model's context warn;
    without matplotlib the JSON and the table are written, no plot, and the CLI says so before the work."""
    from hf_longlora import cli
    from hf_longlora.evaluation import run

    base, adapter, _ = base_and_adapter
    passes = []
    real = run._perplexity
    monkeypatch.setattr(run, "_perplexity", lambda *a, **k: passes.append(a[4]) or real(*a, **k))
    settings = EvalSettings(lengths=[64, 300], max_windows=1, forgetting=False, progress=False)
    caplog.set_level("WARNING")
    results = evaluate_models([ModelSpec(str(base), label="base")], _documents(), settings)
    assert results["models"]["base"]["forgetting"] is None and passes == ["base: perplexity"]
    assert "forgetting" not in format_table(results)
    assert "base has a context of 64 tokens; lengths [300] are more than 4x beyond it" in caplog.text
    caplog.clear()
    evaluate_models(
        [ModelSpec(str(base), label="b")], _documents(), EvalSettings(lengths=[64, 256], max_windows=1)
    )
    assert "beyond it" not in caplog.text  # 4x is the demo's own extension: no warning
    monkeypatch.setattr(run, "plots_available", lambda: False)
    out = tmp_path / "noplots"
    code = cli.main(["eval", "--model", str(base), "--data", "stdlib", "--max-documents", "1", "--lengths", "64",
                     "--max-windows", "1", "--no-forgetting", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and printed.index("plots are skipped") < printed.index("ppl@64")
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval_summary.json"]
