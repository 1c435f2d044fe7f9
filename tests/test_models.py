"""The backend inside real transformers models: Llama, Mistral and Qwen2 built from small configs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config
from reference import reference_attention
from transformers import AttentionInterface, AutoModelForCausalLM, DataCollatorWithFlattening
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_longlora

ARCHS = ["llama", "mistral", "qwen2"]


def build(arch, attn="s2_attention", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model


@pytest.fixture
def saved_llama(tmp_path):
    model = build("llama", attn="sdpa", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_every_architecture(arch, tmp_path):
    build(arch, attn="sdpa", dtype=torch.float32).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="s2_attention", s2_group_size=8
    )
    assert model.config._attn_implementation == "s2_attention"
    ids = torch.randint(0, 128, (1, 40))
    before = hf_longlora.attention.backend.ATTENTION_CALLS["s2"]
    model.train()(ids, labels=ids, use_cache=False).loss.backward()
    assert hf_longlora.attention.backend.ATTENTION_CALLS["s2"] - before == model.config.num_hidden_layers


def test_from_pretrained_with_backend_and_knobs(saved_llama):
    model = AutoModelForCausalLM.from_pretrained(
        saved_llama, attn_implementation="s2_attention", s2_group_size=16, s2_shift="roll"
    )
    assert model.config._attn_implementation == "s2_attention"
    assert model.model.layers[0].self_attn.config.s2_group_size == 16
    assert model.config.s2_shift == "roll"
    assert model.config.s2_group_size_ratio == 0.25  # default
    out_dir = saved_llama / "resaved"
    model.save_pretrained(out_dir)
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["s2_group_size"] == 16 and saved["s2_shift"] == "roll"
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="s2_attention")
    assert reloaded.config.s2_group_size == 16


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"s2_group_size_ratio": 0.0}, r"s2_group_size_ratio must be a float in \(0, 1\]"),
        ({"s2_group_size_ratio": 1.5}, r"s2_group_size_ratio must be a float in \(0, 1\]"),
        ({"s2_group_size": 1}, r"s2_group_size must be an int >= 2 or None"),
        ({"s2_group_size": 8.0}, r"s2_group_size must be an int >= 2 or None"),
        ({"s2_shift": "wrap"}, r"s2_shift must be one of \('partition', 'roll', 'none'\)"),
    ],
)
def test_invalid_knobs_fail_at_load(saved_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved_llama, attn_implementation="s2_attention", **kwargs)


def test_configure_s2_sets_every_config_and_validates_first():
    model = build("llama")
    settings = hf_longlora.configure_s2(model, group_size=32, shift="partition")
    assert settings == hf_longlora.S2Settings(group_size_ratio=0.25, group_size=32, shift="partition")
    assert all(layer.self_attn.config.s2_group_size == 32 for layer in model.model.layers)
    with pytest.raises(ValueError, match="s2_group_size_ratio"):
        hf_longlora.configure_s2(model, group_size=64, group_size_ratio=2.0)
    assert model.config.s2_group_size == 32  # nothing changed by the failed call
    with pytest.raises(TypeError, match="model_or_config"):
        hf_longlora.configure_s2("not a model", group_size=8)


@pytest.mark.parametrize("arch", ARCHS)
def test_set_attn_implementation_and_eval_is_sdpa(arch):
    model = build(arch, attn="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 50))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("s2_attention")
        assert model.config._attn_implementation == "s2_attention"
        got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, want)


def _register_reference(name, docs, **knobs):
    """A test-only backend: the dense fp64 reference, with the documents the test knows."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return reference_attention(query, key, value, docs, scale=scaling, **knobs), None

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_matches_reference_model(arch):
    """Whole-model parity in train mode: s2_attention vs the dense reference plugged into the same weights."""
    ids = torch.randint(0, 128, (2, 64))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # left padding
    docs = [[list(range(64))], [list(range(20, 64))]]
    _register_reference("s2_reference_test", docs, group_size=None, ratio=0.25)
    model = build(arch).train()
    hf_longlora.configure_s2(model, group_size_ratio=0.25)
    got = model(ids, attention_mask=mask, use_cache=False).logits
    model.set_attn_implementation("s2_reference_test")
    want = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(got[1, 20:], want[1, 20:], atol=1e-9, rtol=0)
    # and S2 really differs from full attention here
    model.set_attn_implementation("sdpa")
    full = model(ids, attention_mask=mask, use_cache=False).logits
    assert (full[0] - got[0]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_match_single_rows(arch, side):
    """A padded batch in train mode gives, on each row's real tokens, the logits of the same weights with the dense
    fp64 reference attention (groups start at the row's first real token, shifted heads shifted), and the logits of
    the row run alone."""
    model = build(arch, s2_group_size=8).train()
    lengths = [40, 23, 31]
    rows = [torch.randint(0, 128, (n,)) for n in lengths]
    total = 44
    ids = torch.zeros(len(rows), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    position_ids = torch.zeros_like(ids)
    spans = [slice(total - n, total) if side == "left" else slice(0, n) for n in lengths]
    for b, (row, span) in enumerate(zip(rows, spans, strict=True)):
        ids[b, span], mask[b, span] = row, 1
        position_ids[b, span] = torch.arange(len(row))
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    batched = model(**inputs).logits
    _register_reference("s2_reference_padded", [[list(range(s.start, s.stop))] for s in spans], group_size=8)
    model.set_attn_implementation("s2_reference_padded")
    want = model(**inputs).logits
    model.set_attn_implementation("sdpa")
    full = model(**inputs).logits
    model.set_attn_implementation("s2_attention")
    for b, (row, span) in enumerate(zip(rows, spans, strict=True)):
        torch.testing.assert_close(batched[b, span], want[b, span], atol=1e-9, rtol=0)
        single = model(row[None], use_cache=False).logits[0]
        torch.testing.assert_close(batched[b, span], single, atol=1e-9, rtol=0)
        assert (full[b, span] - want[b, span]).abs().max() > 1e-3  # S2 is not full attention here


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("flash_kwargs", [True, False])
def test_packed_batch_matches_documents_one_at_a_time(arch, flash_kwargs):
    """TRL's padding-free batches (DataCollatorWithFlattening): the logits and the loss of the same weights with the
    dense fp64 reference attention over each document (no attention across documents, groups restart at each), and
    each document's logits run alone."""
    model = build(arch, s2_group_size_ratio=0.25).train()
    docs = [torch.randint(0, 128, (n,)).tolist() for n in (30, 9, 52, 17)]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collator([{"input_ids": d} for d in docs])
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    packed = model(**batch, use_cache=False)
    starts = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()])
    positions = [list(range(a, b)) for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True)]
    _register_reference("s2_reference_packed", [positions], group_size=None, ratio=0.25)
    model.set_attn_implementation("s2_reference_packed")
    want = model(**batch, use_cache=False)
    model.set_attn_implementation("sdpa")
    full = model(**batch, use_cache=False).logits[0]
    model.set_attn_implementation("s2_attention")
    torch.testing.assert_close(packed.logits, want.logits, atol=1e-9, rtol=0)
    torch.testing.assert_close(packed.loss, want.loss, atol=1e-12, rtol=0)
    for d, span in zip(docs, positions, strict=True):
        single = model(torch.tensor([d]), use_cache=False).logits[0]
        torch.testing.assert_close(packed.logits[0, span], single, atol=1e-9, rtol=0)
        # S2 is not full attention here (the 9-token document has one group: there they agree)
        assert len(d) < 16 or (full[span] - want.logits[0, span]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_training_with_s2_lowers_the_loss(arch):
    """A few LoRA steps at 4x the model's context with s2_attention: the loss goes down."""
    from peft import LoraConfig, get_peft_model

    model = build(arch, dtype=torch.float32, max_position_embeddings=64, s2_group_size_ratio=0.25)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["embed_tokens"])
    )
    model.train()
    torch.manual_seed(1)
    pattern = torch.randint(0, 128, (32,))
    ids = pattern.repeat(2, 8)  # (2, 256): 4x the 64-token context
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(b < a for a, b in zip(losses[:6], losses[1:6], strict=False)), losses


# --------------------------------------------------------------- models S2-Attn cannot go into: a clear "no"

# found by probing every causal LM of transformers (issue 13): they compute attention in their own code
NO_ATTENTION_INTERFACE = [
    "bloom", "big_bird", "bigbird_pegasus", "gpt_neox_japanese", "megatron-bert", "mvp", "rembert", "roformer",
    "trocr", "xglm", "openai-gpt", "prophetnet", "falcon", "gpt_neo", "git", "mpt",
]  # fmt: skip


@pytest.mark.parametrize("model_type", NO_ATTENTION_INTERFACE)
def test_models_without_attention_interface_are_refused_at_load(model_type):
    """Refused in the model's __init__, before any layer is built (the default configs here are large: building
    them would take seconds), with a message that names the model type and what to use instead. They used to be
    accepted (bloom: causality broken) or crash with KeyError / AttributeError (falcon, gpt_neo, git, mpt)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    with pytest.raises(
        ValueError, match=rf"model_type '{model_type}'\) computes attention in its own code"
    ) as info:
        AutoModelForCausalLM.from_config(config, attn_implementation="s2_attention")
    assert "attn_implementation='sdpa' or 'eager'" in str(info.value) and "docs/models.md" in str(info.value)


def test_the_refusal_follows_transformers_own_flag_for_every_causal_lm():
    """For every causal-LM class transformers ships, refused exactly when it does not declare AttentionInterface
    support; the families we support (Llama, Mistral, Qwen2, GPT-2, OPT, Gemma2, gpt-oss) are not refused."""
    import importlib

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from hf_longlora.attention.backend import FLOAT_MASK_ONLY, check_model_supports_s2

    refused, accepted = set(), set()
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        cls = getattr(importlib.import_module("transformers"), class_name, None)
        if cls is None:
            continue
        try:
            check_model_supports_s2(cls, model_type)
            accepted.add(model_type)
        except ValueError:
            refused.add(model_type)
        supported = (
            bool(getattr(cls, "_supports_attention_backend", False)) and model_type not in FLOAT_MASK_ONLY
        )
        assert (model_type in accepted) == supported
    assert {"llama", "mistral", "qwen2", "gpt2", "opt", "gemma2", "gpt_oss"} <= accepted
    assert {"bloom", "falcon", "gpt_neo", "mpt", "xglm"} <= refused


def test_other_implementations_of_refused_models_are_untouched():
    from transformers import BloomConfig

    config = BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_dense_fallback_output_is_contiguous_in_a_model_that_views_it():
    """A sliding window narrower than the S2 groups takes the dense path; its output must be contiguous, since
    models .view() it (afmoe crashed: "view size is not compatible with input tensor's size and stride")."""
    from transformers import AfmoeConfig

    torch.manual_seed(0)
    config = AfmoeConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_dense_layers=1,
        vocab_size=128, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
        s2_group_size=8,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="s2_attention").train()
    ids = torch.randint(0, 128, (1, 32))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # raised before
