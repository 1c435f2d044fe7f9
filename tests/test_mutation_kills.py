"""Tests for the plausible bugs that issue #17 found surviving the whole suite, and for untested error branches.

Every test checks what a correct implementation gives against something independent of it: the dense fp64 S2
masks of tests/reference.py, transformers' own ``Trainer.compute_loss`` and model loss, or a value worked out by
hand. tools/mutations.py (``make mutations``) puts each of those bugs into a copy of the package and checks that a
test fails. The sections follow the issue: dense fallback, dropout, sliding window + roll, backend and
``sdpa_varlen_attention`` errors, ``ChunkedLossTrainer``, ``restore_context``, merge's tokenizer files and
``extend_context``'s refusals.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from helpers import (
    attention_module,
    make_tiny_checkpoint,
    padding_mask_4d,
    random_qkv,
    sliding_window_mask,
    tiny_config,
)
from reference import document_mask, reference_attention
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_longlora import s2_attention_forward
from hf_longlora.attention import backend
from hf_longlora.attention.sdpa import sdpa_varlen_attention

FP64_TOL = 1e-10


def run_s2(module, q, k, v, mask=None, **kwargs):
    out, weights = s2_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5, **kwargs)
    assert weights is None
    return out


def s2_pattern(length: int, group: int, heads: int, shift: str = "partition") -> torch.Tensor:
    """(H, L, L) bool: the S2 pattern of one document per head (the last H // 2 heads shifted)."""
    first_shifted = heads - heads // 2
    return torch.stack(
        [document_mask(length, group, shifted=h >= first_shifted, shift=shift) for h in range(heads)]
    )


def masked_attention(q, k, v, allowed, bias=None):
    """Plain fp64 softmax attention: ``allowed`` (B or 1, H, L, L) bool, an optional additive ``bias``.

    Returns (B, L, H, Dv); a query row with nothing allowed outputs zeros.
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    allowed = allowed.expand_as(scores)
    has_any = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_any, 0.0), -1)
    return ((probs * has_any) @ v).transpose(1, 2)


def random_bool_mask(batch: int, length: int, seed: int = 3, density: float = 0.7) -> torch.Tensor:
    """A custom (B, 1, L, L) bool mask, not causal, not padding: the backend must take the dense fallback."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, 1, length, length, generator=g) < density
    return mask | torch.eye(length, dtype=torch.bool)  # every token sees itself (no padding)


# ---------------------------------------------------------------------------------------------------------
# dense fallback: a custom mask AND the S2 pattern


@pytest.mark.parametrize("group", [5, 6])
def test_dense_fallback_with_roll_matches_reference(group):
    """A custom mask with ``s2_shift="roll"``: mask AND the rolled S2 pattern. An odd group size matters: there
    rolling by -h and by +h (the inverse and the forward permutation) give different groups' causal order."""
    length, heads, kv_heads = 4 * group, 4, 2
    module = attention_module(heads, kv_heads, 8, s2_group_size=group, s2_shift="roll")
    q, k, v = random_qkv(2, heads, kv_heads, length, 8, seed=group)
    mask = random_bool_mask(2, length)
    got = run_s2(module, q, k, v, mask)
    want = masked_attention(q, k, v, mask & s2_pattern(length, group, heads, "roll")[None])
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=0)


@pytest.mark.parametrize("shift,group", [("partition", 6), ("roll", 5)])
def test_dense_fallback_with_float_mask_applies_the_s2_pattern(shift, group):
    """An additive float mask (a bias, -inf/finfo.min where masked, as transformers builds for eager) is more
    than padding: the result is softmax(scores + bias) restricted to the S2 pattern."""
    length, heads = 30, 4
    module = attention_module(heads, 2, 8, s2_group_size=group, s2_shift=shift)
    q, k, v = random_qkv(2, heads, 2, length, 8, seed=11)
    g = torch.Generator().manual_seed(5)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    bias = 0.5 * torch.randn(2, 1, length, length, generator=g, dtype=torch.float64)
    mask = bias.masked_fill(~causal, torch.finfo(torch.float64).min)
    got = run_s2(module, q, k, v, mask)
    want = masked_attention(q, k, v, causal & s2_pattern(length, group, heads, shift)[None], bias=bias)
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=0)


def test_sliding_window_with_roll_takes_the_dense_path():
    """With "roll" a group wraps around (its first h tokens sit with the last h), so a window wider than the
    groups still cuts it: the result is window AND rolled S2, not rolled S2 alone."""
    length, group, window, heads = 32, 8, 12, 4
    module = attention_module(heads, 2, 8, s2_group_size=group, s2_shift="roll")
    q, k, v = random_qkv(1, heads, 2, length, 8, seed=2)
    mask = sliding_window_mask(length, window)
    got = run_s2(module, q, k, v, mask, sliding_window=window)
    want = masked_attention(q, k, v, mask & s2_pattern(length, group, heads, "roll")[None])
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=0)
    rolled_only = masked_attention(q, k, v, s2_pattern(length, group, heads, "roll")[None])
    assert not torch.allclose(rolled_only, want)  # the window does cut the rolled groups here


# ---------------------------------------------------------------------------------------------------------
# attention dropout


def _dropout_case(path: str, length: int = 24, group: int = 8):
    """Inputs whose values are one-hot (V = identity), so the output of query i is its attention weights, and
    the reference weights for the same S2 pattern."""
    heads, kv_heads = 4, 2
    module = attention_module(heads, kv_heads, 8, s2_group_size=group)
    q, k, _ = random_qkv(2, heads, kv_heads, length, 8, seed=4)
    v = torch.eye(length, dtype=torch.float64).expand(2, kv_heads, length, length)
    if path == "packed":
        mask = None
        weights = reference_attention(q, k, v, [[list(range(length))]] * 2, group_size=group)
    elif path == "padded":
        mask, docs = padding_mask_4d([length, length - 7], length, "left")
        weights = reference_attention(q, k, v, docs, group_size=group)
    else:  # dense fallback
        mask = random_bool_mask(2, length) & torch.tril(torch.ones(length, length, dtype=torch.bool))
        weights = masked_attention(q, k, v, mask & s2_pattern(length, group, heads)[None])
    return module, q, k, v, mask, weights


@pytest.mark.parametrize("path", ["packed", "padded", "dense"])
def test_dropout_drops_and_rescales_the_s2_attention_weights(path):
    """Each weight of the S2 pattern is either dropped or scaled by 1 / (1 - p), about a fraction p dropped;
    nothing outside the pattern appears; with p = 0 the weights are exactly the reference's."""
    p = 0.5
    module, q, k, v, mask, weights = _dropout_case(path)
    torch.testing.assert_close(run_s2(module, q, k, v, mask), weights, atol=FP64_TOL, rtol=0)
    torch.manual_seed(0)
    got = run_s2(module, q, k, v, mask, dropout=p)
    kept = got != 0
    assert not kept[weights == 0].any()
    torch.testing.assert_close(got[kept], weights[kept] / (1 - p), atol=FP64_TOL, rtol=0)
    dropped = 1 - kept[weights > 0].double().mean().item()
    assert 0.4 < dropped < 0.6, dropped


def test_dropout_mean_and_variance_over_masks():
    """Over many independent dropout masks (one batch of identical rows), each output has the mean of the output
    without dropout and the variance inverted dropout gives: p / (1 - p) * sum_j a_j^2 v_j^2 (a: S2 weights)."""
    p, draws, length, group = 0.3, 2000, 16, 4
    module = attention_module(4, 2, 8, s2_group_size=group)
    q, k, v = random_qkv(1, 4, 2, length, 8, seed=9)
    docs = [[list(range(length))]]
    weights = reference_attention(
        q, k, torch.eye(length, dtype=torch.float64).expand(1, 2, length, length), docs, group_size=group
    )[0].transpose(0, 1)  # (H, L, L)
    values = v[0].repeat_interleave(2, dim=0)  # (H, L, D)
    mean = (weights @ values).transpose(0, 1)  # (L, H, D)
    variance = (p / (1 - p) * (weights.square() @ values.square())).transpose(0, 1)
    torch.testing.assert_close(run_s2(module, q, k, v)[0], mean, atol=FP64_TOL, rtol=0)
    torch.manual_seed(1)
    out = run_s2(module, *(t.expand(draws, -1, -1, -1) for t in (q, k, v)), dropout=p)  # (N, L, H, D)
    z = (out.mean(0) - mean) / (variance / draws).sqrt().clamp_min(1e-12)
    assert z.abs().max() < 5, z.abs().max()
    ratio = out.var(0).sum() / variance.sum()
    assert 0.95 < ratio < 1.05, ratio


def test_attention_dropout_follows_the_module_mode():
    """Through a real LlamaAttention with attention_dropout: training draws masks, eval is exactly sdpa."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    module = attention_module(4, 2, 8, s2_group_size=4, attention_dropout=0.5)
    module.config._attn_implementation = "s2_attention"
    hidden = torch.randn(2, 16, 32)
    position_embeddings = LlamaRotaryEmbedding(module.config)(hidden, torch.arange(16)[None])
    torch.manual_seed(0)
    first = module(hidden, position_embeddings, None)[0]
    torch.manual_seed(1)
    second = module(hidden, position_embeddings, None)[0]
    assert not torch.allclose(first, second)
    module.eval()
    s2_eval = module(hidden, position_embeddings, None)[0]
    module.config._attn_implementation = "sdpa"
    assert torch.equal(s2_eval, module(hidden, position_embeddings, None)[0])


# ---------------------------------------------------------------------------------------------------------
# error branches of the backend


def test_unsupported_kwargs_are_refused():
    """``position_bias`` (T5-style relative bias) has no S2 form: refused in training with what to use."""
    module = attention_module(4, 2, 8, s2_group_size=4)
    q, k, v = random_qkv(1, 4, 2, 16, 8)
    bias = torch.zeros(1, 4, 16, 16, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"s2_attention does not support `position_bias`; use attn_implementation='eager'"
    ):
        run_s2(module, q, k, v, position_bias=bias)
    # None means "not used" (models pass such keys explicitly)
    want = reference_attention(q, k, v, [[list(range(16))]], group_size=4)
    torch.testing.assert_close(run_s2(module, q, k, v, position_bias=None), want, atol=FP64_TOL, rtol=0)


def test_query_heads_must_be_a_multiple_of_kv_heads():
    module = attention_module(4, 2, 8, s2_group_size=4)
    q, _, _ = random_qkv(1, 3, 3, 16, 8)
    _, k, v = random_qkv(1, 2, 2, 16, 8)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        run_s2(module, q, k, v)


@pytest.mark.parametrize(
    "shape", [(2, 16), (2, 1, 16), (2, 1, 16, 17), (2, 1, 15, 16)], ids=["2d", "3d", "wide", "short"]
)
def test_mask_must_be_4d_of_the_sequence_length(shape):
    module = attention_module(4, 2, 8, s2_group_size=4)
    q, k, v = random_qkv(2, 4, 2, 16, 8)
    mask = torch.ones(shape, dtype=torch.bool)
    message = (
        r"s2_attention expects a 4D \(batch, 1, 16, 16\) attention mask in training, got shape "
        + re_tuple(shape)
    )
    with pytest.raises(ValueError, match=message):
        run_s2(module, q, k, v, mask)


def re_tuple(shape) -> str:
    return r"\(" + r", ".join(str(n) for n in shape) + r"\)"


@pytest.mark.parametrize("cu,ends", [([0, 5, 30], "0..30"), ([2, 10, 32], "2..32"), ([0, 16, 40], "0..40")])
def test_cu_seq_lens_must_cover_the_batch(cu, ends):
    module = attention_module(4, 2, 8, s2_group_size=4)
    q, k, v = random_qkv(2, 4, 2, 16, 8)
    cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(
        ValueError, match=rf"cu_seq_lens_q must run from 0 to batch \* seq_len = 32 .*got {ends}"
    ):
        run_s2(module, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


@pytest.mark.parametrize("how", ["module", "argument"])
def test_non_causal_attention_is_full_sdpa(how):
    """A non-causal module (or is_causal=False) in training gets transformers' sdpa: every token sees every
    token, no S2 groups."""
    module = attention_module(4, 2, 8, s2_group_size=4)
    kwargs = {}
    if how == "module":
        module.is_causal = False
    else:
        kwargs["is_causal"] = False
    q, k, v = random_qkv(2, 4, 2, 16, 8, seed=6)
    before = dict(backend.ATTENTION_CALLS)
    got = run_s2(module, q, k, v, **kwargs)
    assert backend.ATTENTION_CALLS["full"] == before["full"] + 1
    assert backend.ATTENTION_CALLS["s2"] == before["s2"]
    everything = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    torch.testing.assert_close(got, masked_attention(q, k, v, everything), atol=FP64_TOL, rtol=0)
    sdpa = sdpa_attention_forward(module, q, k, v, None, scaling=8**-0.5, **kwargs)[0]
    assert torch.equal(got, sdpa)


def test_all_padding_batch_outputs_zeros():
    module = attention_module(4, 2, 8, s2_group_size=4)
    q, k, v = random_qkv(2, 4, 2, 12, 8)
    mask, _ = padding_mask_4d([0, 0], 12, "right")
    got = run_s2(module, q, k, v, mask)
    assert got.shape == (2, 12, 4, 8) and got.dtype == torch.float64
    assert torch.count_nonzero(got) == 0


# ---------------------------------------------------------------------------------------------------------
# sdpa_varlen_attention


def test_sdpa_varlen_matches_causal_attention_per_segment():
    lengths = [3, 3, 1, 5, 5, 2]
    total = sum(lengths)
    q, k, v = (t[0].transpose(0, 1) for t in random_qkv(1, 4, 2, total, 8, seed=8))  # (T, H, D)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    got = sdpa_varlen_attention(q, k, v, cu)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        allowed[start:end, start:end] = torch.tril(torch.ones(end - start, end - start, dtype=torch.bool))
    want = masked_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], allowed
    )
    torch.testing.assert_close(got, want[0], atol=FP64_TOL, rtol=0)


@pytest.mark.parametrize("cu,ends", [([0, 4, 9], "0..9"), ([1, 10], "1..10"), ([0, 11], "0..11")])
def test_sdpa_varlen_cu_seqlens_must_span_the_tokens(cu, ends):
    q, k, v = (torch.randn(10, 2, 4) for _ in range(3))
    with pytest.raises(ValueError, match=rf"cu_seqlens must start at 0 and end at 10 tokens, got {ends}"):
        sdpa_varlen_attention(q, k, v, cu)


def test_sdpa_varlen_heads_must_be_a_multiple_of_kv_heads():
    q, k, v = torch.randn(10, 3, 4), torch.randn(10, 2, 4), torch.randn(10, 2, 4)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        sdpa_varlen_attention(q, k, v, [0, 10])


# ---------------------------------------------------------------------------------------------------------
# ChunkedLossTrainer: DDP's loss scale and the fallbacks to Trainer.compute_loss


def _loss_model(seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size=96)).to(torch.float32).eval()


def _loss_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 20), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0  # padding
    labels[1, -6:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trainer(model, tmp_path, compute_loss_func=None, **args):
    from hf_longlora.training.loss import ChunkedLossTrainer

    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", **args
    )
    return ChunkedLossTrainer(model=model, args=arguments, compute_loss_func=compute_loss_func)


def _hand_loss(model, batch, num_items=None, label_smoothing=0.0):
    """The causal-LM loss computed by hand from the full logits: shift, ignore -100, mean or sum / num_items."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    reduction = "mean" if num_items is None else "sum"
    loss = torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=-100, reduction=reduction, label_smoothing=label_smoothing
    )
    return loss if num_items is None else loss / num_items


@pytest.mark.parametrize("average", [True, False])
def test_chunked_loss_keeps_ddps_average_tokens_scale(tmp_path, monkeypatch, average):
    """With average_tokens_across_devices, num_items_in_batch counts the tokens of every process, so each
    process's loss is multiplied by the number of processes (DDP then averages the gradients), exactly as
    Trainer.compute_loss does; without it, or without num_items_in_batch, nothing is scaled."""
    model = _loss_model()
    trainer = _trainer(model, tmp_path, average_tokens_across_devices=average)
    assert trainer.model_accepts_loss_kwargs
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    assert trainer.accelerator.num_processes == 2
    batch, items = _loss_batch(), torch.tensor(40)
    single = _hand_loss(model, batch, items)
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        plain = Trainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=items)
        unscaled = trainer.compute_loss(model, dict(batch))
    expected = 2 * single if average else single
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unscaled, _hand_loss(model, batch), rtol=1e-5, atol=1e-6)


def test_chunked_loss_falls_back_for_label_smoothing(tmp_path):
    model = _loss_model()
    trainer = _trainer(model, tmp_path, label_smoothing_factor=0.1)
    batch = _loss_batch()
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch))
        plain = Trainer.compute_loss(trainer, model, dict(batch))
    want = _hand_loss(model, batch, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, _hand_loss(model, batch))  # smoothing changes the loss


def test_chunked_loss_falls_back_to_compute_loss_func(tmp_path):
    def custom(outputs, labels, num_items_in_batch=None):
        return outputs.logits.float().square().mean() + (labels != -100).sum()

    model = _loss_model()
    trainer = _trainer(model, tmp_path, compute_loss_func=custom)
    batch = _loss_batch()
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = logits.square().mean() + (batch["labels"] != -100).sum()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_chunked_loss_falls_back_when_outputs_are_returned(tmp_path):
    model = _loss_model()
    trainer = _trainer(model, tmp_path)
    batch = _loss_batch()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert outputs.logits.shape == (2, 20, 96)
    torch.testing.assert_close(outputs.logits, logits)
    torch.testing.assert_close(loss, _hand_loss(model, batch), rtol=1e-5, atol=1e-6)


def test_chunked_loss_falls_back_for_a_batch_without_labels(tmp_path):
    """Without labels the model computes no loss: Trainer's own error, not the chunked loss's."""
    model = _loss_model()
    trainer = _trainer(model, tmp_path)
    batch = {k: v for k, v in _loss_batch().items() if k != "labels"}
    with torch.no_grad():
        with pytest.raises(ValueError, match="The model did not return a loss from the inputs"):
            Trainer.compute_loss(trainer, model, dict(batch))
        with pytest.raises(ValueError, match="The model did not return a loss from the inputs"):
            trainer.compute_loss(model, dict(batch))


def _gemma2(softcap: float):
    """A tiny Gemma 2 whose logits are large enough (LM head scaled up) for the soft-capping to matter."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=96,
        tie_word_embeddings=False,
        final_logit_softcapping=softcap,
    )
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(500.0)
    return model


def _check_softcapped_loss_falls_back(tmp_path, softcap: float):
    from hf_longlora.training.loss import causal_lm_loss

    model = _gemma2(softcap)
    trainer = _trainer(model, tmp_path)
    batch = _loss_batch()
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch))
        want = model(**batch).loss
        uncapped = causal_lm_loss(model, dict(batch))
    assert not torch.allclose(uncapped, want, rtol=1e-2)  # the capping matters for these logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_loss_falls_back_for_logit_softcapping(tmp_path):
    """Gemma 2 caps its logits after the LM head (30 * tanh(logits / 30)): the chunked loss would miss it."""
    _check_softcapped_loss_falls_back(tmp_path, 30.0)


def test_chunked_loss_falls_back_for_a_softcap_of_one(tmp_path):
    _check_softcapped_loss_falls_back(tmp_path, 1.0)


# ---------------------------------------------------------------------------------------------------------
# restore_context


@pytest.mark.parametrize(
    "method,max_positions",
    [("linear", 256), ("yarn", 256), ("dynamic", 64)],
    ids=["linear", "yarn", "dynamic"],
)
def test_restore_context_sets_the_extended_config(method, max_positions):
    """Extending 64 -> 256 tokens: linear and YaRN set max_position_embeddings to 256; dynamic NTK keeps it at the
    original 64 (it scales from there as sequences grow) and records the 256-token target separately. A fresh base
    restored from the adapter record must be configured, and compute, exactly like the extended model."""
    from hf_longlora.adapters.config import LongLoraConfig
    from hf_longlora.adapters.context import context_length, extend_context
    from hf_longlora.adapters.lifecycle import record_context, restore_context

    torch.manual_seed(0)
    extended = LlamaForCausalLM(tiny_config(max_position_embeddings=64)).eval()
    extend_context(extended, 256, method)
    record = record_context(LongLoraConfig(), extended)
    fresh = LlamaForCausalLM(tiny_config(max_position_embeddings=64)).eval()
    fresh.load_state_dict(extended.state_dict())
    restore_context(fresh, record)
    assert fresh.config.rope_parameters["rope_type"] == method
    assert fresh.config.rope_parameters["factor"] == 256 / 64
    assert fresh.config.max_position_embeddings == max_positions == extended.config.max_position_embeddings
    assert fresh.config.original_max_position_embeddings == 64
    assert context_length(fresh) == 256
    ids = torch.randint(0, 128, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, extended(ids).logits, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# merge copies the tokenizer


def test_merge_copies_every_tokenizer_file(tmp_path):
    """The merged folder holds every file the base's tokenizer saved, byte for byte, and AutoTokenizer loads
    it; a tokenizer saved with the adapter wins over the base's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_longlora import get_longlora_model, merge_and_save

    base = make_tiny_checkpoint(tmp_path / "base")
    model_files = {"config.json", "generation_config.json", "model.safetensors"}
    tokenizer_files = sorted(p.name for p in base.iterdir() if p.name not in model_files)
    assert "tokenizer.json" in tokenizer_files
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")
    get_longlora_model(model).save_pretrained(tmp_path / "adapter")

    out = merge_and_save(str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    for name in tokenizer_files:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    text = "def merge(base, adapter):\n    return base + adapter"
    original = AutoTokenizer.from_pretrained(base)
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == original(text)["input_ids"]

    own = AutoTokenizer.from_pretrained(base)
    own.add_tokens(["<adapter-token>"])
    own.save_pretrained(tmp_path / "adapter")
    out = merge_and_save(str(base), str(tmp_path / "adapter"), str(tmp_path / "merged2"))
    assert len(AutoTokenizer.from_pretrained(out)) == len(original) + 1


# ---------------------------------------------------------------------------------------------------------
# extend_context's refusals


@pytest.mark.parametrize("target", [0, -5, 1.5, "1024", True, None], ids=repr)
def test_extend_context_refuses_a_bad_target(target):
    from hf_longlora import extend_context

    with pytest.raises(ValueError, match=r"target_length must be a positive int, got "):
        extend_context(tiny_config(), target)


def test_extend_context_refuses_what_is_not_a_model_or_config():
    from hf_longlora import extend_context

    with pytest.raises(
        TypeError, match="model_or_config must be a transformers model or a PreTrainedConfig, got dict"
    ):
        extend_context({"max_position_embeddings": 64}, 128)
    with pytest.raises(TypeError, match="got Linear"):
        extend_context(torch.nn.Linear(2, 2), 128)


def test_extend_context_refuses_a_model_without_rope():
    from transformers import GPT2Config

    from hf_longlora import extend_context

    with pytest.raises(
        ValueError, match=r"extend_context: GPT2Config has no RoPE parameters \(not a RoPE model\?\)"
    ):
        extend_context(GPT2Config(n_positions=64), 128)


def test_extend_context_refuses_per_layer_type_rope():
    from hf_longlora import extend_context

    config = tiny_config()
    per_layer = {"rope_type": "default", "rope_theta": 10000.0}
    config.rope_parameters = {"full_attention": dict(per_layer), "sliding_attention": dict(per_layer)}
    with pytest.raises(ValueError, match="per-layer-type RoPE parameters are not supported"):
        extend_context(config, 4096)


def test_extend_context_refuses_a_method_and_a_shorter_target_before_changing_anything():
    from hf_longlora import extend_context

    config = tiny_config(max_position_embeddings=300)
    with pytest.raises(ValueError, match=r"method must be one of \('linear', 'yarn', 'dynamic'\), got 'ntk'"):
        extend_context(config, 1000, method="ntk")
    with pytest.raises(
        ValueError, match="target_length=200 is shorter than the model's current context of 300"
    ):
        extend_context(config, 200)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.max_position_embeddings == 300
    assert getattr(config, "original_max_position_embeddings", None) is None
    # a target within the original context changes nothing either
    assert extend_context(config, 300) == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.max_position_embeddings == 300


def test_extend_context_factor_by_hand():
    """linear: ceil(1000 / 300) = 4, context 1000; dynamic: 1000 / 300, context stays 300; yarn: 1000 / 300."""
    from hf_longlora import extend_context

    for method, factor, max_positions in (
        ("linear", 4.0, 1000),
        ("dynamic", 1000 / 300, 300),
        ("yarn", 1000 / 300, 1000),
    ):
        config = tiny_config(max_position_embeddings=300)
        params = extend_context(config, 1000, method)
        assert params["rope_type"] == method and math.isclose(params["factor"], factor)
        assert config.max_position_embeddings == max_positions
        assert config.original_max_position_embeddings == 300 and config.longlora_context_length == 1000


# ---------------------------------------------------------------------------------------------------------
# stale checkpoints (the run-level test is slow: this checks the rule itself)


def test_stale_checkpoints_are_refused_unless_resumed_or_overwritten(tmp_path):
    from hf_longlora.training.checks import stale_checkpoints

    out = tmp_path / "out"
    for step in (1, 2, 3, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / "checkpoint-notes.txt").write_text("a file, not a checkpoint")
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None)
    with pytest.raises(
        ValueError,
        match=r"holds another run's checkpoints \(checkpoint-1, checkpoint-2, checkpoint-3, \.\.\.\)",
    ):
        stale_checkpoints(args, SimpleNamespace(overwrite_output_dir=False))
    found = stale_checkpoints(args, SimpleNamespace(overwrite_output_dir=True))
    assert [p.name for p in found] == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    for resume in (True, "true", str(out / "checkpoint-2")):
        args.resume_from_checkpoint = resume
        assert stale_checkpoints(args, SimpleNamespace(overwrite_output_dir=False)) == []
    for not_resuming in (False, "", "false", "False"):
        args.resume_from_checkpoint = not_resuming
        with pytest.raises(ValueError, match="holds another run's checkpoints"):
            stale_checkpoints(args, SimpleNamespace(overwrite_output_dir=False))
    assert (
        stale_checkpoints(
            SimpleNamespace(output_dir=str(tmp_path / "new"), resume_from_checkpoint=None), None
        )
        == []
    )


# ---------------------------------------------------------------------------------------------------------
# --config files that are not a mapping


def test_read_config_empty_and_non_mapping(tmp_path):
    from hf_longlora.cli import read_config

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert read_config(str(empty)) == {}
    listed = tmp_path / "list.yaml"
    listed.write_text("- model_name_or_path: m\n- max_steps: 3\n")
    with pytest.raises(ValueError, match=rf"--config {listed}: must hold key: value lines, got a list"):
        read_config(str(listed))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(ValueError, match="must hold key: value lines, got a str"):
        read_config(str(scalar))
    assert read_config(str(write(tmp_path / "ok.yaml", "max_steps: 3\ncorpus: stdlib\n"))) == {
        "max_steps": 3,
        "corpus": "stdlib",
    }


def write(path, text: str):
    path.write_text(text)
    return path
