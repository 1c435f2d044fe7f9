"""Attention sinks (gpt-oss) and logit soft-capping (Gemma 2) in S2-Attn: training against the dense fp64 reference
(tests/reference.py, extended with both), evaluation and generation equal to the model's own eager attention."""

from __future__ import annotations

import pytest
import torch
from helpers import attention_module, padding_mask_4d, random_qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_attention
from transformers import AutoModelForCausalLM

from hf_longlora import s2_attention_forward

FP64_TOL = 1e-10
HEAD_LAYOUTS = [(2, 1), (4, 2), (4, 4), (9, 3), (3, 1)]


def run_s2(module, q, k, v, mask=None, **kwargs):
    out, weights = s2_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5, **kwargs)
    assert weights is None
    return out


@st.composite
def cases(draw):
    heads, kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.integers(2, 48)) for _ in range(batch)]
    group = draw(st.integers(2, 17))
    side = draw(st.sampled_from(["left", "right"]))
    total = max(lengths) + draw(st.integers(0, 3))
    feature = draw(st.sampled_from(["sinks", "softcap", "both"]))
    return heads, kv_heads, lengths, total, group, side, feature


@settings(max_examples=40, deadline=None)
@given(case=cases(), seed=st.integers(0, 2**16))
def test_sinks_and_softcap_match_the_reference_fp64(case, seed):
    heads, kv_heads, lengths, total, group, side, feature = case
    module = attention_module(heads, kv_heads, 8, s2_group_size=group)
    q, k, v = random_qkv(len(lengths), heads, kv_heads, total, 8, seed=seed)
    q = q * 3  # large scores, so soft-capping bites
    generator = torch.Generator().manual_seed(seed)
    sinks = torch.randn(heads, dtype=torch.float64, generator=generator) if feature != "softcap" else None
    softcap = 2.0 if feature != "sinks" else None
    if all(n == total for n in lengths):
        mask, docs = None, [[list(range(total))] for _ in lengths]
    else:
        mask, docs = padding_mask_4d(lengths, total, side)
    got = run_s2(module, q, k, v, mask, s_aux=sinks, softcap=softcap)
    want = reference_attention(q, k, v, docs, group_size=group, softcap=softcap, sinks=sinks)
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=0)


def test_sinks_and_softcap_change_the_output():
    """The features are not no-ops on these inputs (so the parity above would catch them being dropped)."""
    module = attention_module(4, 2, 8, s2_group_size=8)
    q, k, v = random_qkv(1, 4, 2, 32, 8)
    plain = run_s2(module, q * 3, k, v)
    assert (run_s2(module, q * 3, k, v, s_aux=torch.ones(4, dtype=torch.float64)) - plain).abs().max() > 1e-2
    assert (run_s2(module, q * 3, k, v, softcap=2.0) - plain).abs().max() > 1e-2


def test_gradients_with_sinks_and_softcap_match_the_reference():
    module = attention_module(9, 3, 8, s2_group_size=6)
    q, k, v = random_qkv(2, 9, 3, 30, 8, requires_grad=True)
    sinks = torch.randn(9, dtype=torch.float64, requires_grad=True)
    mask, docs = padding_mask_4d([30, 21], 30, "left")
    got = run_s2(module, q, k, v, mask, s_aux=sinks, softcap=3.0)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v, sinks))
    want = reference_attention(q, k, v, docs, group_size=6, softcap=3.0, sinks=sinks)
    expected = torch.autograd.grad(want.square().sum(), (q, k, v, sinks))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=0)


def test_dense_fallback_with_a_sliding_window_and_sinks():
    """A sliding window narrower than the groups (dense path) with sinks and softcap: reference AND window."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    module = attention_module(4, 2, 8, s2_group_size=16)
    q, k, v = random_qkv(1, 4, 2, 40, 8)
    window = sdpa_mask(
        batch_size=1, q_length=40, kv_length=40, mask_function=sliding_window_causal_mask_function(5),
        allow_is_causal_skip=False, device="cpu",
    )  # fmt: skip
    sinks = torch.linspace(-1, 1, 4, dtype=torch.float64)
    got = run_s2(module, q * 3, k, v, window, s_aux=sinks, softcap=2.0)
    want = reference_attention(
        q * 3, k, v, [[list(range(40))]], group_size=16, softcap=2.0, sinks=sinks, extra_mask=window
    )
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=0)
    assert got.is_contiguous()


def test_bf16_with_sinks_within_pytorch_error():
    """flash-attention's rule: the error against fp64 within a small multiple of plain PyTorch's own bf16 error
    (here: the model's eager formula computed in bf16, on S2's mask)."""
    module = attention_module(4, 2, 16, s2_group_size=16)
    q, k, v = random_qkv(1, 4, 2, 64, 16)
    sinks = torch.randn(4, dtype=torch.float64)
    want = reference_attention(q, k, v, [[list(range(64))]], group_size=16, sinks=sinks, softcap=5.0)
    low = [t.to(torch.bfloat16) for t in (q, k, v, sinks)]
    got = run_s2(module, *low[:3], s_aux=low[3], softcap=5.0).double()
    plain = reference_attention(
        *low[:3], [[list(range(64))]], group_size=16, sinks=low[3], softcap=5.0
    ).double()
    err, err_plain = (got - want).abs().max(), (plain - want).abs().max()
    assert err_plain > 0 and err <= 2 * err_plain, (err, err_plain)


# ------------------------------------------------------------------------- real models: train, eval, generate


def tiny_model(model_type: str, attn: str, seed: int = 0):
    from transformers import Gemma2Config, GptOssConfig

    torch.manual_seed(seed)
    if model_type == "gpt_oss":
        config = GptOssConfig(
            hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, num_local_experts=4, num_experts_per_tok=2, vocab_size=128, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], s2_group_size=16,
        )  # fmt: skip
    else:
        config = Gemma2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, vocab_size=128, sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=None,
            query_pre_attn_scalar=8, s2_group_size=16,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    if model_type == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 1)  # non-trivial sinks
    return model


@pytest.mark.parametrize("model_type", ["gpt_oss", "gemma2"])
def test_eval_and_generate_equal_the_models_eager_attention(model_type):
    """Evaluation used transformers' sdpa, which drops sinks (gpt-oss logits off by 0.35) and refuses softcap."""
    s2 = tiny_model(model_type, "s2_attention").eval()
    eager = tiny_model(model_type, "eager").eval()
    eager.load_state_dict(s2.state_dict())
    ids = torch.randint(0, 128, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(
            s2(ids, attention_mask=mask).logits[mask.bool()], eager(ids, attention_mask=mask).logits[mask.bool()],
            atol=1e-5, rtol=1e-5,
        )  # fmt: skip
        if (
            model_type == "gpt_oss"
        ):  # the sinks matter here: a path that drops them (transformers' sdpa) is off
            dropped = tiny_model(model_type, "eager").eval()
            dropped.load_state_dict(s2.state_dict())
            for layer in dropped.model.layers:
                layer.self_attn.sinks.fill_(-1e4)  # exp(sink) = 0: what ignoring s_aux computes
            assert (dropped(ids[:1]).logits - eager(ids[:1]).logits).abs().max() > 1e-3
        prompt = ids[:1, :6]
        greedy = {"max_new_tokens": 8, "do_sample": False}
        assert torch.equal(s2.generate(prompt, **greedy), eager.generate(prompt, **greedy))


@pytest.mark.parametrize("model_type", ["gpt_oss", "gemma2"])
def test_training_step_runs_s2_with_sinks_and_softcap(model_type):
    from hf_longlora.attention.backend import ATTENTION_CALLS

    model = tiny_model(model_type, "s2_attention").train()
    ids = torch.randint(0, 128, (1, 40))
    before = ATTENTION_CALLS["s2"]
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert ATTENTION_CALLS["s2"] - before == 2 and torch.isfinite(loss)
    if model_type == "gpt_oss":
        assert model.model.layers[0].self_attn.sinks.grad.abs().max() > 0  # the sinks are trained through S2
