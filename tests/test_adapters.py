"""LongLoraConfig, context extension, adapter save/reload, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_config
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

import hf_longlora
from hf_longlora import LongLoraConfig, extend_context, get_longlora_model, load_adapter
from hf_longlora.adapters.lifecycle import restore_context

ARCHS = ["llama", "mistral", "qwen2"]


def base_model(arch="llama", seed=0, attn="s2_attention", **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attn)


def train_a_little(model, steps=3, length=96, seed=0):
    torch.manual_seed(seed)
    model.train()
    ids = torch.randint(0, 128, (2, length))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return ids


@pytest.fixture
def saved_base(tmp_path):
    path = tmp_path / "base"
    base_model(attn="sdpa").save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- LongLoraConfig


def test_config_defaults_follow_the_paper():
    config = LongLoraConfig()
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.0)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert config.trainable_embeddings and config.trainable_norms
    assert config.modules_to_save == ["embed_tokens", "norm"]
    assert LongLoraConfig(trainable_norms=False).modules_to_save == ["embed_tokens"]
    assert LongLoraConfig(trainable_embeddings=False, trainable_norms=False).modules_to_save is None
    assert LongLoraConfig(modules_to_save=["score"]).modules_to_save == ["score", "embed_tokens", "norm"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"trainable_embeddings": False, "modules_to_save": ["embed_tokens"]},
            "trainable_embeddings=False contradicts",
        ),
        ({"trainable_norms": False, "modules_to_save": ["norm"]}, "trainable_norms=False contradicts"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "puts LoRA on"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"norm_module_names": "norm"}, "norm_module_names must be a list"),
        ({"context_length": -5}, "context_length must be a positive int"),
    ],
)
def test_contradictory_config_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LongLoraConfig(**kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_exactly_embeddings_norms_and_lora_train(arch):
    model = get_longlora_model(base_model(arch))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    full = {
        n.split(".modules_to_save.")[0].removeprefix("base_model.model.")
        for n in trainable
        if "modules_to_save" in n
    }
    layers = tiny_config(arch).num_hidden_layers
    expected = {"model.embed_tokens", "model.norm"} | {
        f"model.layers.{i}.{name}"
        for i in range(layers)
        for name in ("input_layernorm", "post_attention_layernorm")
    }
    assert full == expected
    lora = {n for n in trainable if "lora_" in n}
    assert len(lora) == layers * 4 * 2  # A and B on q, k, v, o
    assert trainable == lora | {n for n in trainable if "modules_to_save" in n}
    assert not any("lm_head" in n for n in trainable)


def test_tied_embeddings_train_one_tensor_and_stay_tied(tmp_path):
    model = get_longlora_model(base_model("llama", tie_word_embeddings=True))
    embed = model.base_model.model.model.embed_tokens.modules_to_save["default"].weight
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert head is embed and embed.requires_grad
    n_trained_embeddings = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora" not in n
    )
    assert n_trained_embeddings == embed.numel() + sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "norm" in n
    )
    ids = train_a_little(model)
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(
        base_model("llama", tie_word_embeddings=True, attn="sdpa"), str(tmp_path / "adapter")
    )
    r_embed = reloaded.base_model.model.model.embed_tokens.modules_to_save["default"].weight
    assert reloaded.base_model.model.lm_head.modules_to_save["default"].weight is r_embed
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max() <= 1e-6


def test_norm_names_that_miss_norms_are_refused():
    with pytest.raises(ValueError, match="leaves these norms frozen"):
        get_longlora_model(base_model(), LongLoraConfig(norm_module_names=["input_layernorm"]))
    with pytest.raises(ValueError, match="does not match the model's input embedding"):
        get_longlora_model(base_model(), LongLoraConfig(embedding_module_names=["wte"]))


# ------------------------------------------------------------------------------------------- context extension


def test_extend_context_linear_is_idempotent_and_never_compounds():
    config = tiny_config("llama", max_position_embeddings=300)
    params = extend_context(config, 1000)
    assert params["rope_type"] == "linear" and params["factor"] == math.ceil(1000 / 300) == 4
    assert config.max_position_embeddings == 1000 and config.original_max_position_embeddings == 300
    assert extend_context(config, 1000) == params  # same target: nothing changes
    assert config.rope_parameters["factor"] == 4
    extend_context(config, 2400)
    assert config.rope_parameters["factor"] == 8  # from the original 300, not 4 * ...
    with pytest.raises(ValueError, match="shorter than the model's current context of 2400"):
        extend_context(config, 1200)


def test_extend_context_yarn_and_dynamic():
    config = tiny_config("llama", max_position_embeddings=256)
    extend_context(config, 1024, method="yarn")
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["original_max_position_embeddings"] == 256
    config = tiny_config("llama", max_position_embeddings=256)
    extend_context(config, 1024, method="dynamic")
    assert config.rope_parameters == {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    assert config.max_position_embeddings == 256  # dynamic NTK scales from the original length
    assert hf_longlora.adapters.context.context_length(config) == 1024
    with pytest.raises(ValueError, match="method must be one of"):
        extend_context(config, 2048, method="ntk")


def test_extend_context_yarn_rope_options_set_the_ramp():
    """YaRN's beta_fast / beta_slow count rotations over the original context: with beta_fast=4 every dimension
    that turns more than 4 times in 256 tokens keeps its frequency, beta_slow=1 interpolates every one that turns
    less than once, and transformers' defaults (32 / 1) keep almost nothing of a 256-token model."""
    original = tiny_config("llama", max_position_embeddings=256, hidden_size=128, num_attention_heads=2)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)  # (32,) head_dim 64
    rotations = 256 * inv_freq / (2 * math.pi)
    for options, fast, slow in (({"beta_fast": 4.0, "beta_slow": 1.0}, 4, 1), ({}, 32, 1)):
        config = tiny_config("llama", max_position_embeddings=256, hidden_size=128, num_attention_heads=2)
        params = extend_context(config, 1024, method="yarn", rope_options=options)
        assert {k: params[k] for k in options} == options
        model = AutoModelForCausalLM.from_config(config)
        got = model.model.rotary_emb.inv_freq.double()
        kept, interpolated = rotations > fast + 1, rotations < slow - 0.01  # clear of the ramp's rounding
        assert kept.any() and interpolated.any()
        torch.testing.assert_close(got[kept], inv_freq[kept], rtol=1e-6, atol=0)
        torch.testing.assert_close(got[interpolated], inv_freq[interpolated] / 4, rtol=1e-6, atol=0)
        if options:
            assert int(kept.sum()) >= 8  # with the defaults only the fastest 1-2 dimensions would be kept
    assert original.rope_parameters.get("rope_type", "default") == "default"  # a fresh config each time


def test_extend_context_rope_options_are_checked_before_anything_changes():
    config = tiny_config("llama", max_position_embeddings=256)
    before = dict(config.rope_parameters)
    bad = [
        ("linear", {"beta_fast": 4}, r"rope_options: \['beta_fast'\] not allowed with rope_method='linear'"),
        ("yarn", {"beta_fast": 4, "alpha": 1}, r"\['alpha'\] not allowed .* allowed: \['beta_fast'"),
        ("yarn", {"beta_fast": -1}, r"rope_options\['beta_fast'\] must be a positive number, got -1"),
        ("yarn", {"beta_fast": True}, "must be a positive number, got True"),
        ("yarn", {"truncate": 1}, r"rope_options\['truncate'\] must be a bool"),
        ("yarn", {"beta_fast": 1, "beta_slow": 2}, r"beta_slow \(2\) must be below beta_fast \(1\)"),
        ("yarn", ["beta_fast"], "rope_options must be a dict"),
    ]
    for method, options, message in bad:
        with pytest.raises(ValueError, match=message):
            extend_context(config, 1024, method=method, rope_options=options)
    with pytest.raises(ValueError, match="rope_options given but target_length=256 does not extend"):
        extend_context(config, 256, method="yarn", rope_options={"beta_fast": 4})
    assert config.rope_parameters == before and config.max_position_embeddings == 256
    with pytest.raises(ValueError, match="rope_options needs context_length"):
        hf_longlora.load_model("unused", rope_method="yarn", rope_options={"beta_fast": 4})


def test_yarn_rope_options_travel_with_the_adapter(tmp_path):
    model = base_model(attn="sdpa", max_position_embeddings=64)
    extend_context(model, 256, method="yarn", rope_options={"beta_fast": 4.0, "beta_slow": 1.0})
    peft_model = get_longlora_model(model)
    ids = train_a_little(peft_model, length=200)
    with torch.no_grad():
        want = peft_model(ids).logits
    base_dir = tmp_path / "base"
    base_model(attn="sdpa", max_position_embeddings=64).save_pretrained(base_dir)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter(str(base_dir), str(tmp_path / "adapter"), attn_implementation="sdpa")
    params = loaded.get_base_model().config.rope_parameters
    assert (params["rope_type"], params["beta_fast"], params["beta_slow"]) == ("yarn", 4.0, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=0)


def test_extend_context_on_a_model_rebuilds_rotary_embeddings():
    model = base_model(attn="sdpa", max_position_embeddings=64).eval()
    extend_context(model, 256)
    torch.manual_seed(0)
    config = tiny_config(
        "llama", max_position_embeddings=256, rope_parameters={"rope_type": "linear", "factor": 4.0}
    )
    fresh = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 128, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, atol=1e-6, rtol=0)
    assert torch.allclose(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)


def test_extend_context_refuses_already_scaled_rope():
    config = tiny_config("llama", rope_parameters={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="already uses rope_type='linear'"):
        extend_context(config, 4096)


# --------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_restores_extension_and_logits(arch, tmp_path):
    model = base_model(arch, max_position_embeddings=64)
    extend_context(model, 256)
    hf_longlora.configure_s2(model, group_size=32)
    peft_model = get_longlora_model(model)
    ids = train_a_little(peft_model, length=200)
    with torch.no_grad():
        want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["context_length"] == 256 and saved["rope_parameters"]["factor"] == 4.0
    assert saved["s2_attention"] == {"group_size_ratio": 0.25, "group_size": 32, "shift": "partition"}

    config = LongLoraConfig.from_pretrained(tmp_path / "adapter")
    assert isinstance(config, LongLoraConfig) and config.context_length == 256 and config.trainable_embeddings

    # our loader: a fresh base at its native 64 tokens; the extension comes back from the adapter
    fresh = base_model(arch, attn="sdpa", max_position_embeddings=64)
    reloaded = load_adapter(fresh, str(tmp_path / "adapter"))
    assert reloaded.config.max_position_embeddings == 256
    with torch.no_grad():
        assert (reloaded(ids).logits - want).abs().max().item() <= 1e-6

    # plain PEFT loads the same files (it drops the LongLoRA fields; restore_context re-applies the extension)
    plain_base = base_model(arch, attn="sdpa", max_position_embeddings=64)
    plain = PeftModel.from_pretrained(plain_base, tmp_path / "adapter")
    restore_context(plain.base_model.model, config)
    with torch.no_grad():
        assert (plain(ids).logits - want).abs().max().item() <= 1e-6


def test_auto_peft_model_loads_the_adapter(saved_base, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_base, attn_implementation="s2_attention")
    peft_model = get_longlora_model(model)
    ids = train_a_little(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        assert (auto(ids).logits - peft_model(ids).logits).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------------------------------- bad input


def _saved_adapter(tmp_path, arch="llama", config=None, **overrides):
    peft_model = get_longlora_model(base_model(arch, **overrides), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_for_another_base_is_refused_naming_the_module(tmp_path):
    adapter = _saved_adapter(tmp_path)
    other = base_model(attn="sdpa", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(
        ValueError, match=r"different base: 'model.embed_tokens.weight' has shape \[128, 96\]"
    ):
        load_adapter(other, str(adapter))
    lora_only = _saved_adapter(
        tmp_path / "lora", config=LongLoraConfig(trainable_embeddings=False, trainable_norms=False)
    )
    with pytest.raises(
        ValueError, match=r"different base: module 'model.layers.0.self_attn.k_proj' has in_features=96"
    ):
        load_adapter(other, str(lora_only))
    deeper = base_model(attn="sdpa", num_hidden_layers=1)
    with pytest.raises(
        ValueError, match=r"adapter module 'model.layers.1.input_layernorm' does not exist in the base model"
    ):
        load_adapter(deeper, str(adapter))
    bigger_vocab = base_model(attn="sdpa", vocab_size=256)
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' has shape \[256, 64\] in the base"):
        load_adapter(bigger_vocab, str(adapter))


def test_missing_and_corrupt_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        load_adapter(base_model(attn="sdpa"), str(tmp_path))
    adapter = _saved_adapter(tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(base_model(attn="sdpa"), str(adapter))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_adapter(base_model(attn="sdpa"), str(adapter))
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        LongLoraConfig.from_pretrained(adapter)


def test_unknown_config_fields_are_refused(tmp_path):
    adapter = _saved_adapter(tmp_path)
    path = adapter / "adapter_config.json"
    data = json.loads(path.read_text())
    data["trainable_embedings"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown LongLoraConfig fields \['trainable_embedings'\]"):
        LongLoraConfig.from_pretrained(adapter)
    with pytest.raises(ValueError, match="unknown LongLoraConfig fields"):
        load_adapter(base_model(attn="sdpa"), str(adapter))


def test_get_longlora_model_leaves_the_callers_config_alone():
    from peft import PeftModelForCausalLM

    config = LongLoraConfig()
    model = get_longlora_model(base_model(tie_word_embeddings=True), config)
    assert isinstance(model, PeftModelForCausalLM)
    assert config.context_length is None and not config.ensure_weight_tying
    assert (
        model.peft_config["default"].ensure_weight_tying
        and model.peft_config["default"].context_length == 512
    )


def test_trainable_token_adapter_round_trip(tmp_path):
    config = LongLoraConfig(trainable_embeddings=False, trainable_token_indices=[1, 2, 3])
    model = get_longlora_model(base_model(), config)
    ids = train_a_little(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(base_model(attn="sdpa"), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max() <= 1e-6


def test_s2_settings_are_restored_for_further_training(tmp_path, saved_base):
    model = AutoModelForCausalLM.from_pretrained(saved_base, attn_implementation="s2_attention")
    hf_longlora.configure_s2(model, group_size=16, shift="roll")
    get_longlora_model(model).save_pretrained(tmp_path / "adapter")
    resumed = load_adapter(saved_base, tmp_path / "adapter", is_trainable=True)  # a Path works too
    assert resumed.config._attn_implementation == "s2_attention"
    assert hf_longlora.S2Settings.from_config(resumed.config) == hf_longlora.S2Settings(0.25, 16, "roll")
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)


def test_mismatch_is_found_before_the_base_weights_load(tmp_path, saved_base):
    adapter = _saved_adapter(tmp_path)  # hidden 64
    other = tmp_path / "other"
    base_model(attn="sdpa", hidden_size=96).save_pretrained(other)
    (other / "model.safetensors").write_bytes(b"these weights are never read")
    with pytest.raises(ValueError, match="different base"):
        load_adapter(str(other), str(adapter))


# ------------------------------------------------------------------------------------- PEFT's keywords


def test_get_longlora_model_takes_pefts_keywords():
    """``peft_config=`` as users type it for get_peft_model, and PEFT's other keywords reach get_peft_model."""
    from peft import PeftMixedModel

    model = get_longlora_model(base_model(), peft_config=LongLoraConfig(), revision="v1.2")
    assert isinstance(model, PeftModel) and model.peft_config["default"].revision == "v1.2"
    # our recording still happens
    assert model.peft_config["default"].context_length == model.config.max_position_embeddings
    mixed = get_longlora_model(base_model(), LongLoraConfig(trainable_embeddings=False), "x", mixed=True)
    assert isinstance(mixed, PeftMixedModel) and "x" in mixed.peft_config
    # autocast_adapter_dtype: PEFT keeps bf16 LoRA weights in fp32 unless told not to
    bf16 = base_model().to(torch.bfloat16)
    kept = get_longlora_model(bf16, LongLoraConfig(), autocast_adapter_dtype=False)
    lora_a = kept.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.dtype == torch.bfloat16
    cast = get_longlora_model(base_model().to(torch.bfloat16), LongLoraConfig())
    assert (
        cast.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    )
    # low_cpu_mem_usage: the adapter weights are created on the meta device (to be loaded afterwards)
    empty = get_longlora_model(base_model(), LongLoraConfig(), low_cpu_mem_usage=True)
    assert empty.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.is_meta


def test_get_longlora_model_old_keyword_still_works():
    with pytest.warns(DeprecationWarning, match="use peft_config"):
        model = get_longlora_model(base_model(), config=LongLoraConfig(r=4))
    assert model.peft_config["default"].r == 4
    with pytest.raises(TypeError, match="not both peft_config and config"):
        get_longlora_model(base_model(), LongLoraConfig(), config=LongLoraConfig())
    with pytest.raises(TypeError, match="peft_config must be a LongLoraConfig, got LoraConfig"):
        get_longlora_model(base_model(), LoraConfig())


def test_configure_s2_signature_shows_its_defaults():
    import inspect

    signature = str(inspect.signature(hf_longlora.configure_s2))
    assert "object at" not in signature
    assert "group_size_ratio: 'float' = UNCHANGED" in signature and "shift: 'str' = UNCHANGED" in signature
    config = tiny_config()
    hf_longlora.configure_s2(config, shift="roll")
    settings = hf_longlora.configure_s2(config, group_size=32)  # the shift set before stays
    assert (settings.shift, settings.group_size, settings.group_size_ratio) == ("roll", 32, 0.25)


# ------------------------------------------------------------------------ adapters made with plain PEFT


def test_plain_peft_adapter_never_loses_its_extension_silently(tmp_path, saved_base):
    """get_peft_model(model, LongLoraConfig()) after extend_context saves no context record: load_adapter and
    merge refuse it and say how to supply the context; given, the result equals the trained model."""
    from peft import get_peft_model

    from hf_longlora import cli, merge_and_save

    model = AutoModelForCausalLM.from_pretrained(saved_base, attn_implementation="s2_attention")
    extend_context(model, 2048)
    peft_model = get_peft_model(model, LongLoraConfig())
    ids = train_a_little(peft_model, length=200)
    with torch.no_grad():
        want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "plain")
    adapter = str(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"does not record the context it was trained at .*context_length=N"):
        load_adapter(str(saved_base), adapter)
    with pytest.raises(ValueError, match="does not record the context"):
        merge_and_save(str(saved_base), adapter, str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
    loaded = load_adapter(str(saved_base), adapter, context_length=2048).eval()
    assert loaded.config.rope_parameters["factor"] == 4.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    out = tmp_path / "merged"
    code = cli.main(
        [
            "merge",
            "--base",
            str(saved_base),
            "--adapter",
            adapter,
            "--out",
            str(out),
            "--context-length",
            "2048",
        ]
    )
    assert code == 0 and json.loads((out / "config.json").read_text())["rope_parameters"]["factor"] == 4.0
    # an adapter with a record refuses a contradicting context_length
    recorded = get_longlora_model(base_model())
    recorded.save_pretrained(tmp_path / "rec")
    with pytest.raises(ValueError, match="contradicts the adapter's record"):
        load_adapter(base_model(), str(tmp_path / "rec"), context_length=999)
