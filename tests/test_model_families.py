"""One model family per attention feature, through the all-model probe (``tools/probe_models.py``).

Each case builds a tiny fp64 model of the family and checks, against the dense fp64 reference of
``tests/reference.py``: every training-mode attention call on the same q/k/v, the training loss and every gradient
(the reference as the model's attention function), evaluation logits (and against the model's own eager attention),
and padding invariance. The full table for every causal LM of transformers is ``docs/models.md``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import probe_models  # noqa: E402

# feature -> (model type, config overrides on top of the probe's tiny config, a feature the probe must detect)
FAMILIES = {
    "odd GQA 9/3": ("llama", {"num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 8}, "GQA 9/3"),
    "MLA, value dim != q/k dim": ("deepseek_v3", {"v_head_dim": 12}, "value dim differs"),
    "sliding window narrower than the groups": ("mistral", {"sliding_window": 5}, "sliding window"),
    "hybrid sliding/full layers": ("gemma3_text", {}, "hybrid layers (full_attention, sliding_attention)"),
    "chunked attention": ("llama4_text", {}, "chunked attention"),
    "partial rotary": ("gpt_neox", {}, "partial rotary"),
    "qk-norm": ("qwen3", {}, "qk-norm"),
    "MoE": ("qwen3_moe", {}, "MoE"),
    "sinks": ("gpt_oss", {}, "sinks"),
    "softcap": ("gemma2", {}, "softcap"),
    "learned additive mask": ("doge", {}, "GQA 4/2"),
}


@pytest.mark.parametrize("feature", list(FAMILIES))
def test_family_is_exact(feature):
    model_type, overrides, detected = FAMILIES[feature]
    result = probe_models.probe(model_type, overrides)
    assert result.status == "exact", (result.detail, result.errors)
    assert detected in result.features, result.features
    assert set(result.errors) >= {"train", "loss", "backward", "eval", "eval (own)", "padding"}
    assert all(result.errors[name] <= probe_models.TOLERANCES[name] for name in result.errors)


def test_the_probe_catches_a_broken_shift(monkeypatch):
    """The probe is a check that can fail: with the shifted half computed unshifted, llama is a mismatch."""
    import dataclasses

    from hf_longlora.attention import backend

    real = backend.plan_s2

    def unshifted(*args, **kwargs):
        plan = real(*args, **kwargs)
        return dataclasses.replace(
            plan,
            shifted_cu_seqlens=plan.unshifted_cu_seqlens,
            max_shifted=plan.max_unshifted,
            shifted_permutation=None,
        )

    monkeypatch.setattr(backend, "plan_s2", unshifted)
    monkeypatch.setattr(backend, "_layout_cache", backend._LayoutCache())  # no plan made before the patch
    result = probe_models.probe("llama")
    assert result.status == "mismatch" and result.errors["train"] > 1e-3, result


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("bloom", "computes attention in its own code"),  # no AttentionInterface
        ("deepseek_v4", "inverts it for the boolean mask"),  # float-mask-only
    ],
)
def test_refusals_are_recorded_with_their_message(model_type, message):
    result = probe_models.probe(model_type)
    assert result.status == "refused" and message in result.detail


def test_the_report(tmp_path):
    out = tmp_path / "models.md"
    assert probe_models.main(["--only", "llama", "bloom", "--out", str(out)]) == 0
    text = out.read_text()
    assert re.search(r"^\| llama \| LlamaForCausalLM \| exact \| GQA 4/2 \| ", text, re.M)
    assert "- **bloom** (BloomForCausalLM): BloomForCausalLM (model_type 'bloom') computes attention" in text
    assert "**1 exact, 1 refused** (of 2 model types)" in text
    with pytest.raises(SystemExit):
        probe_models.main(["--only", "no_such_model", "--out", str(out)])


def test_the_committed_table_is_the_probes_for_this_transformers():
    """docs/models.md was written by the probe over every causal-LM type of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = (ROOT / "docs" / "models.md").read_text()
    assert f"`python tools/probe_models.py` with transformers {transformers.__version__}," in text
    rows = re.findall(
        r"^\| ([\w-]+) \| \w+ \| (exact|refused|mismatch|no attention|fails without S2|probe failed) \|",
        text,
        re.M,
    )
    assert sorted(t for t, _ in rows) == sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    counts = {s: sum(1 for _, x in rows if x == s) for s in {x for _, x in rows}}
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: -x[1]))
    assert f"**{summary}** (of {len(rows)} model types)" in text
