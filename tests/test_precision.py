"""fp32 master weights for the trained embedding and norm copies of a bf16 base (hf_longlora/adapters/precision.py).

The reference for the gradients is the same model in fp64: the upcast copies' gradients must be at least as close
to it as the bf16 copies' gradients that plain PEFT gives (the flash-attention rule, with the bf16 path as
"PyTorch's own error at the same precision").
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config
from transformers import LlamaForCausalLM

from hf_longlora import LongLoraConfig, get_longlora_model, load_adapter
from hf_longlora.adapters.precision import upcast_trained_copies
from hf_longlora.training.loss import causal_lm_loss


def bf16_base(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A tiny bf16 Llama whose norm weights are not all 1.0 (as in a trained model: a weight of 1.0 hides how a
    norm rounds its product)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=tie, attn_implementation="sdpa"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.to(torch.bfloat16).train()


def trained_copies(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n}


def batch(seed: int = 1, length: int = 24) -> dict:
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("tie", [False, True])
def test_trained_copies_are_fp32_and_the_frozen_base_stays_bf16(tie):
    model = get_longlora_model(bf16_base(tie), LongLoraConfig())
    copies = trained_copies(model)
    assert copies and all(p.dtype == torch.float32 for p in copies.values()), {
        n: p.dtype for n, p in copies.items()
    }
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen.values()) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # PEFT's own
    if tie:  # the head's copy and the embedding's copy are still one Parameter
        assert model.get_output_embeddings().modules_to_save["default"].weight is (
            model.get_input_embeddings().modules_to_save["default"].weight
        )


def test_fp32_base_and_autocast_adapter_dtype_false_are_left_alone():
    torch.manual_seed(0)
    fp32 = get_longlora_model(LlamaForCausalLM(tiny_config()), LongLoraConfig())
    assert upcast_trained_copies(fp32) == []
    kept = get_longlora_model(bf16_base(), LongLoraConfig(), autocast_adapter_dtype=False)
    assert {p.dtype for p in trained_copies(kept).values()} == {torch.bfloat16}


@pytest.mark.parametrize("tie", [False, True])
def test_the_forward_is_unchanged_and_stays_bf16(tie):
    """Before any step the upcast model computes what the bf16 model computes: the copies' weights hold the bf16
    values and their outputs go back to bf16, so every hidden state is bit-identical and stays bf16 (and so does
    the residual stream's memory). The tied head's copy multiplies in fp32 and rounds once: within 1 bf16 ulp."""
    base = bf16_base(tie)
    plain = get_longlora_model(copy.deepcopy(base), LongLoraConfig(), autocast_adapter_dtype=False)
    upcast = get_longlora_model(base, LongLoraConfig())
    inputs = batch()
    with torch.no_grad():
        want = plain(input_ids=inputs["input_ids"], output_hidden_states=True)
        got = upcast(input_ids=inputs["input_ids"], output_hidden_states=True)
    assert all(h.dtype == torch.bfloat16 for h in got.hidden_states)
    for mine, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert got.logits.dtype == want.logits.dtype == torch.bfloat16
    if tie:
        torch.testing.assert_close(got.logits, want.logits, rtol=2**-7, atol=1e-5)
    else:
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)


def test_norms_and_embeddings_train_at_a_small_learning_rate():
    """The bug this guards: with bf16 copies, AdamW's lr-sized step on a norm weight of 1.0 rounds away."""
    results = {}
    for upcast in (False, True):
        model = get_longlora_model(bf16_base(), LongLoraConfig(), autocast_adapter_dtype=upcast)
        copies = trained_copies(model)
        before = {n: p.detach().clone() for n, p in copies.items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
        for _ in range(3):
            model(**batch()).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results[upcast] = {n: bool((p.detach() != before[n]).any()) for n, p in copies.items()}
    norms = [n for n in results[True] if "norm" in n]
    assert norms and all(results[True][n] for n in results[True]), results[True]
    assert not any(results[False][n] for n in norms), "bf16 norms moved: the test no longer shows the bug"


def fp64_reference_grads(base_bf16, inputs) -> dict[str, torch.Tensor]:
    model = get_longlora_model(copy.deepcopy(base_bf16).to(torch.float64), LongLoraConfig())
    model(**inputs).loss.backward()
    return {n: p.grad for n, p in trained_copies(model).items()}


@pytest.mark.parametrize("tie", [False, True])
def test_copy_gradients_are_at_least_as_accurate_as_bf16(tie):
    base = bf16_base(tie, seed=3)
    inputs = batch(seed=4, length=64)
    reference = fp64_reference_grads(base, inputs)
    errors = {}
    for upcast in (False, True):
        model = get_longlora_model(copy.deepcopy(base), LongLoraConfig(), autocast_adapter_dtype=upcast)
        model(**inputs).loss.backward()
        grads = {n: p.grad for n, p in trained_copies(model).items()}
        assert grads.keys() == reference.keys()
        errors[upcast] = {
            n: ((g.double() - reference[n]).norm() / reference[n].norm()).item() for n, g in grads.items()
        }
    for name, error in errors[True].items():
        # bf16 activations bound both; the fp32 copies add no error of their own (a bound that a wrong cast,
        # e.g. gradients through a detached copy, breaks by orders of magnitude)
        assert error <= 1.5 * errors[False][name] + 1e-3, (name, error, errors[False][name])
        assert error < 0.05, (name, error)


def test_fused_loss_with_an_upcast_tied_head_matches_the_plain_loss():
    """The fused chunked loss reads the head copy's fp32 weight next to bf16 hidden states (SmolLM2's tie)."""
    model = get_longlora_model(bf16_base(tie=True), LongLoraConfig())
    inputs = batch(length=40)
    fused = causal_lm_loss(model, inputs, chunk_size=16, fused=True)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in trained_copies(model).items()}
    model.zero_grad()
    plain = model(**inputs).loss
    plain.backward()
    torch.testing.assert_close(fused.float(), plain.float(), rtol=1e-2, atol=1e-2)
    for name, p in trained_copies(model).items():
        rel = ((fused_grads[name] - p.grad).norm() / p.grad.norm()).item()
        assert rel < 0.03, (name, rel)


def test_a_trainable_reload_upcasts_and_an_inference_load_does_not(tmp_path):
    model = get_longlora_model(bf16_base(tie=True), LongLoraConfig())
    model.save_pretrained(tmp_path / "adapter")
    again = load_adapter(bf16_base(tie=True), str(tmp_path / "adapter"), is_trainable=True)
    assert {p.dtype for p in trained_copies(again).values()} == {torch.float32}
    inference = load_adapter(bf16_base(tie=True), str(tmp_path / "adapter"))
    assert {p.dtype for n, p in inference.named_parameters() if "modules_to_save" in n} == {torch.bfloat16}
    with torch.no_grad():
        ids = batch()["input_ids"]
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_a_model_cast_to_bf16_afterwards_still_runs():
    """DeepSpeed's bf16 mode casts the whole module (model.bfloat16()) after the adapter is made: the copies'
    hooks then follow the weights' dtype instead of forcing fp32 inputs into a bf16 head."""
    model = get_longlora_model(bf16_base(tie=True), LongLoraConfig())
    model.bfloat16()
    ids = batch()["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
