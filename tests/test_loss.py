"""Chunked causal-LM loss: same loss and gradients as the model's own, without the full logits."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import tiny_config
from transformers import LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

from hf_longlora import LongLoraConfig, get_longlora_model
from hf_longlora.training.loss import (
    ChunkedLossTrainer,
    causal_lm_loss,
    chunked_causal_lm_loss,
    supports_chunked_loss,
)


def _model(tied: bool, longlora: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(tie_word_embeddings=tied, vocab_size=96)
    model = LlamaForCausalLM(config).to(torch.float32)
    if longlora:
        model = get_longlora_model(
            model, LongLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        )
        # LoRA B starts at zero: make the adapter active so its gradients are not trivially equal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _batch(seed=1, batch=2, length=37, vocab=96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt without loss
    mask = torch.ones_like(ids)
    if batch > 1:
        labels[1, -9:] = -100  # padding
        mask[1, -9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("num_items", [None, 50])
def test_same_loss_and_gradients_as_the_model(tied, num_items):
    model = _model(tied)
    batch = _batch()
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    reference = model(**batch, use_cache=False, **extra).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad()

    loss = causal_lm_loss(model, batch, num_items_in_batch=extra.get("num_items_in_batch"), chunk_size=16)
    loss.backward()
    got = _grads(model)

    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    assert set(got) == set(expected)
    names = set(expected)
    assert any("lora_A" in n for n in names) and any("embed_tokens" in n for n in names)
    assert any("norm" in n for n in names)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_full_model_gradients_including_the_head():
    model = _model(tied=False, longlora=False)
    batch = _batch(seed=3)
    model(**batch, use_cache=False).loss.backward()
    expected = _grads(model)
    model.zero_grad()
    causal_lm_loss(model, batch, chunk_size=7).backward()
    got = _grads(model)
    assert "lm_head.weight" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_shift_labels_and_no_grad():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=True)
    hidden = torch.randn(2, 9, 8)
    labels = torch.randint(0, 11, (2, 9))
    logits = head(hidden)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), shifted.reshape(-1), ignore_index=-100
    )
    with torch.no_grad():
        got = chunked_causal_lm_loss(hidden, head, shift_labels=shifted, chunk_size=4)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="labels"):
        chunked_causal_lm_loss(hidden, head)


def test_logit_transforms_fall_back_to_the_plain_loss():
    assert supports_chunked_loss(LlamaForCausalLM(tiny_config()))
    assert not supports_chunked_loss(LlamaForCausalLM(tiny_config(final_logit_softcapping=30.0)))


def _train_one_step(trainer_cls, tmp_path, tied, **training):
    model = _model(tied, seed=5)
    rows = []
    for seed in range(4):  # 4 micro-batches of one row, different numbers of labelled tokens
        b = _batch(seed=10 + seed, batch=1, length=21 + 4 * seed)
        b["labels"][0, : 3 * seed] = -100
        rows.append({k: v[0, :21] for k, v in b.items()})
    args = TrainingArguments(
        output_dir=str(tmp_path / trainer_cls.__name__),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        data_seed=0,
        **training,
    )
    trainer = trainer_cls(
        model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=default_data_collator
    )
    result = trainer.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return result.training_loss, params


@pytest.mark.parametrize("tied", [False, True])
def test_trainer_gradient_accumulation_matches_transformers(tmp_path, tied, monkeypatch):
    """One SGD step over 4 accumulated micro-batches with different label counts: same loss and same update."""
    import hf_longlora.training.loss as loss_module

    calls = []
    original = loss_module.causal_lm_loss
    monkeypatch.setattr(loss_module, "causal_lm_loss", lambda *a, **k: calls.append(k) or original(*a, **k))
    loss_plain, plain = _train_one_step(Trainer, tmp_path, tied)
    assert not calls
    loss_chunked, chunked = _train_one_step(ChunkedLossTrainer, tmp_path, tied)
    assert len(calls) == 4  # the chunked path ran on every micro-batch
    assert loss_chunked == pytest.approx(loss_plain, rel=1e-6)
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_runs_the_chunked_loss_under_its_mixed_precision(tmp_path, monkeypatch):
    """accelerate autocasts only the model's forward; the LM head runs after it, in the loss, and must get the same
    autocast (else a bf16 model's head meets fp32-converted hidden states, and an fp32 model's head runs in fp32)."""
    import hf_longlora.training.loss as loss_module

    seen = []
    original = loss_module.causal_lm_loss
    monkeypatch.setattr(
        loss_module,
        "causal_lm_loss",
        lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or original(*a, **k),
    )
    _train_one_step(ChunkedLossTrainer, tmp_path, tied=True, bf16=True)
    assert seen == [True] * 4
    seen.clear()
    _train_one_step(ChunkedLossTrainer, tmp_path, tied=True)
    assert seen == [False] * 4


# ---------------------------------------------------------------------------------------------------------
# The fused path: gradients computed in the forward, no recompute


def _plain_reference(hidden, weight, bias, targets, normaliser):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / normaliser


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 23])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_fused_matches_plain_cross_entropy_fp64(with_bias, num_items, chunk_size):
    g = torch.Generator().manual_seed(chunk_size)
    head = torch.nn.Linear(12, 29, bias=with_bias, dtype=torch.float64)
    hidden = torch.randn(3, 11, 12, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 29, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, -3:] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    flat = shifted.reshape(-1)
    normaliser = (flat != -100).sum() if num_items is None else num_items
    want = _plain_reference(hidden.reshape(-1, 12), head.weight, head.bias, flat, normaliser)
    want_grads = torch.autograd.grad(want * 1.7, [hidden, *head.parameters()])
    got = chunked_causal_lm_loss(
        hidden, head, labels, num_items_in_batch=num_items, chunk_size=chunk_size, fused=True
    )
    got_grads = torch.autograd.grad(got * 1.7, [hidden, *head.parameters()])  # a non-unit upstream gradient
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_backward_does_no_matrix_products():
    """The checkpointed path recomputes each chunk's logits in the backward; the fused one only scales."""
    from torch.utils.flop_counter import FlopCounterMode

    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 50, (40,))
    flops = {}
    for fused in (True, False):
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=8, fused=fused)
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        flops[fused] = counter.get_total_flops()
    assert flops[True] == 0
    assert flops[False] >= 3 * 2 * 39 * 16 * 50  # recompute + input grad + weight grad, ~2 flops per MAC


def test_fused_backward_hands_its_gradients_over_once():
    """The backward scales the gradients made in the forward in place and returns them (no copy of the (V, H) head
    gradient): the head's .grad is that very buffer. A second backward through the same graph is refused."""
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 50, (40,))
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=8, fused=True)
    stored = loss.grad_fn.grads[1].data_ptr()  # no reference kept: autograd may then take the buffer itself
    (2 * loss).backward(retain_graph=True)
    assert head.weight.grad.data_ptr() == stored
    reference = torch.nn.functional.cross_entropy(
        (hidden @ head.weight.t())[:-1], labels[1:], reduction="mean"
    )
    expected = torch.autograd.grad(2 * reference, head.weight)[0]
    torch.testing.assert_close(head.weight.grad, expected)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_fused_under_autocast_keeps_one_low_precision_copy_per_chunk(monkeypatch):
    """Under bf16 autocast the chunk's gradient is cast once (both products read the same bf16 tensor)."""
    import hf_longlora.training.loss as loss_module

    casts = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if (
            out.dtype == torch.bfloat16
            and self.dtype == torch.float32
            and self.dim() == 2
            and self.shape[1] == 50
        ):
            casts.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 50, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_module.chunked_causal_lm_loss(hidden, head, labels, chunk_size=8, fused=True)
    assert casts == [(8, 50)] * 5


def test_fused_path_is_chosen_for_plain_and_tied_heads_only(monkeypatch):
    import hf_longlora.training.loss as loss_module

    calls = []
    real = loss_module._FusedLinearCrossEntropy.apply
    monkeypatch.setattr(loss_module._FusedLinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    batch = _batch()
    for tied in (
        False,
        True,
    ):  # untied: a plain Linear; tied: PEFT's trainable copy behind ModulesToSaveWrapper
        calls.clear()
        causal_lm_loss(_model(tied), batch, chunk_size=16).backward()
        assert calls == [1], tied

    # LoRA on the head: the head's own forward must run (checkpointed chunks), with the model's loss and gradients
    torch.manual_seed(0)
    model = get_longlora_model(
        LlamaForCausalLM(tiny_config(vocab_size=96)),
        LongLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    reference = model(**batch, use_cache=False).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad()
    calls.clear()
    loss = causal_lm_loss(model, batch, chunk_size=16)
    loss.backward()
    assert calls == []
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    got = _grads(model)
    assert any("lm_head.lora_A" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="fused=True needs a plain nn.Linear"):
        chunked_causal_lm_loss(
            torch.randn(1, 4, 32),
            model.get_output_embeddings(),
            torch.zeros(1, 4, dtype=torch.long),
            fused=True,
        )


@pytest.mark.parametrize("with_bias", [False, True])
# (8192, 2048): one slice, one part. (128, 128): the fp32 logits are filled in three vocabulary slices. (128, 48): and
# the fp32 head (cast for every product, its gradient made) is used in parts of 48 rows within each slice
@pytest.mark.parametrize("vocab_slice,cast_slice", [(8192, 2048), (128, 128), (128, 48)])
def test_fused_under_bf16_autocast_within_pytorch_error(with_bias, vocab_slice, cast_slice, monkeypatch):
    """flash-attention's rule: error vs an fp64 reference within a small multiple of plain PyTorch's own error."""
    import hf_longlora.training.loss as loss_module

    monkeypatch.setattr(loss_module, "_VOCAB_SLICE", vocab_slice)
    monkeypatch.setattr(loss_module, "_CAST_SLICE", cast_slice)
    g = torch.Generator().manual_seed(0)
    head64 = torch.nn.Linear(64, 300, bias=with_bias, dtype=torch.float64)
    hidden64 = torch.randn(2, 96, 64, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (2, 96), generator=g)
    labels[1, :10] = -100
    flat = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    params64 = [head64.weight] + ([head64.bias] if with_bias else [])
    ref = _plain_reference(hidden64.reshape(-1, 64), head64.weight, head64.bias, flat, (flat != -100).sum())
    ref_grads = torch.autograd.grad(ref, [hidden64, *params64])

    def run(fn):
        head = torch.nn.Linear(64, 300, bias=with_bias)
        head.load_state_dict({k: v.float() for k, v in head64.state_dict().items()})
        hidden = hidden64.detach().float().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(hidden, head)
        return loss, torch.autograd.grad(loss, [hidden, *head.parameters()])

    plain_loss, plain_grads = run(
        lambda h, head: _plain_reference(
            h.reshape(-1, 64), head.weight, head.bias, flat, (flat != -100).sum()
        )
    )
    fused_loss, fused_grads = run(
        lambda h, head: chunked_causal_lm_loss(h, head, labels, chunk_size=32, fused=True)
    )
    assert abs(fused_loss.double() - ref) <= 2 * abs(plain_loss.double() - ref) + 1e-6
    for got, plain, want in zip(fused_grads, plain_grads, ref_grads, strict=True):
        err_plain = (plain.double() - want).abs().max()
        assert 0 < err_plain < 0.05 * want.abs().max()  # bf16 really ran
        assert (got.double() - want).abs().max() <= 2 * err_plain


def test_fused_with_a_bf16_head_and_fp32_hidden_states_outside_autocast():
    """A bf16 model's outputs that accelerate converted to fp32, next to its bf16 head, with no autocast around the
    loss: the products run in bf16 (the head's dtype), within 2x the plain bf16 head's own error vs fp64."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden_bf16 = torch.randn(2, 96, 64, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 300, (2, 96), generator=g)
    flat = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    count = (flat != -100).sum()

    def reference(dtype):
        hidden = hidden_bf16.to(dtype).requires_grad_(True)
        logits = torch.nn.functional.linear(hidden, head.weight.to(dtype)).reshape(-1, 300).double()
        loss = torch.nn.functional.cross_entropy(logits, flat, ignore_index=-100, reduction="sum") / count
        return loss, torch.autograd.grad(loss, hidden)[0]

    want_loss, want_grad = reference(torch.float64)
    plain_loss, plain_grad = reference(torch.bfloat16)
    hidden = hidden_bf16.float().requires_grad_(True)  # accelerate's convert_outputs_to_fp32
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=32, fused=True)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert grad.dtype == torch.float32
    assert abs(loss.double() - want_loss) <= 2 * abs(plain_loss - want_loss) + 1e-6
    err_plain = (plain_grad.double() - want_grad).abs().max()
    assert err_plain > 0
    assert (grad.double() - want_grad).abs().max() <= 2 * err_plain


@pytest.mark.parametrize("trained_head", [False, True], ids=["frozen bf16 head", "trained fp32 head"])
def test_fused_loss_holds_one_chunk_and_one_slice_at_a_time(trained_head, monkeypatch):
    """The fused loss's peak memory under bf16 autocast, from the allocator's events: the chunk's fp32 logits, the
    gradients it makes and one vocabulary slice's bf16 gradient, plus at most one part's cast and product; nothing
    from a finished chunk or slice (a tensor, or a view of one, kept alive into the next chunk's logits)."""
    from helpers import peak_allocated_bytes

    import hf_longlora.training.loss as loss_module

    monkeypatch.setattr(loss_module, "_VOCAB_SLICE", 1024)
    monkeypatch.setattr(loss_module, "_CAST_SLICE", 256)
    n_tokens, hidden_size, vocab, chunk = 512, 64, 2048, 128
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)  # fp32 master weight
    if not trained_head:
        head = head.to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(1, n_tokens, hidden_size, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, n_tokens), generator=g)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk, fused=True)

    _, peak = peak_allocated_bytes(loss)
    logits = chunk * vocab * 4  # the chunk's fp32 logits (the softmax and its gradient reuse them)
    slice_gradient = chunk * 1024 * 2  # one vocabulary slice of the logits' gradient, bf16
    grads = (
        n_tokens * hidden_size * 2 + chunk * hidden_size * 4
    )  # the hidden states' gradient, the chunk's fp32 one
    if trained_head:
        grads += vocab * hidden_size * 4  # the head's fp32 gradient
        # one part (256 rows) of the head cast to bf16, and that part's weight-gradient product
        parts = 2 * 256 * hidden_size * 2
    else:
        parts = chunk * hidden_size * 2  # the product with the slice (the head is used as it is)
    # oneDNN's bf16 products allocate a scratch buffer of their own: measured on one product of the slice's shape
    a = torch.randn(chunk, 1024).to(torch.bfloat16)
    b = torch.randn(1024, hidden_size).to(torch.bfloat16)
    _, scratch = peak_allocated_bytes(lambda: a @ b)
    expected = logits + slice_gradient + grads + parts + scratch
    assert peak <= expected + slice_gradient // 4, (peak, expected)
    assert peak >= logits + grads  # the accounting saw the loss's buffers at all
