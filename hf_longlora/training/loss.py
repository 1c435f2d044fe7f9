"""Causal-LM loss without the full-vocabulary logits of the whole sequence.

A causal LM's own loss (``model(..., labels=...)``) builds ``(batch, seq, vocab)`` logits and an fp32 copy of them:
at 32k tokens and a 32k vocabulary that is 4 GiB in fp32, plus as much again for their gradient, more than the
rest of a LongLoRA step. Here the model returns only its last hidden states (``logits_to_keep=1``,
``output_hidden_states=True``) and the LM head and cross-entropy run over ``chunk_size`` tokens at a time, so at
most one chunk's logits exist at once.

Two ways to do that, same loss and gradients:

- **fused** (a plain ``nn.Linear`` head, also behind PEFT's ``modules_to_save`` copy): each chunk's logits are
  turned into the loss *and* its gradients right away (``softmax - onehot``, then ``@ W`` for the hidden states
  and ``^T @ h`` for a trainable head), as Liger-Kernel's fused linear cross-entropy does. The backward only
  scales the stored gradients: the head runs twice per token (forward, input gradient), three times when it is
  trained, and never again.
- **checkpointed** (any other head: LoRA on the head, a quantized head, ZeRO-3 or FSDP parameters): each chunk
  runs under activation checkpointing, so the backward recomputes its logits: one more head product per token.

The loss and its gradients are the model's own (``transformers.loss.ForCausalLMLoss``): labels shifted by one,
``-100`` ignored, a mean over the labelled tokens, or a sum divided by ``num_items_in_batch`` when the trainer
passes it (gradient accumulation normalised over the whole accumulated batch).

TRL's SFTTrainer computes its loss in chunks itself (its fused LM head), so :func:`hf_longlora.training.run_sft`
needs nothing; :func:`hf_longlora.training.run_pretraining` (transformers' ``Trainer``) uses
:class:`ChunkedLossTrainer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.utils import ModulesToSaveWrapper
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from .schedule import FirstStepLearnsMixin, ResumeFromCompleteCheckpointMixin
from .sequence_parallel import SequenceParallelMixin

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024
# vocabulary rows per low-precision product when the fused loss fills a chunk's fp32 logits
_VOCAB_SLICE = 8192
# ... and per product when the head's weight must be cast for it (an fp32 master weight under bf16 autocast: a
# trained LM head): the cast copy and the weight-gradient product are this many rows, a quarter of a slice
_CAST_SLICE = 2048
# config attributes that change the logits after the LM head: the plain loss is used for such models
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs (as transformers' loss upcasts its logits); fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(_loss_dtype(t.dtype))


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = _upcast(head(hidden))
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _plain_linear(head: torch.nn.Module) -> torch.nn.Linear | None:
    """The ``nn.Linear`` that ``head(x)`` runs, when it is nothing more than that; else ``None``.

    Sees through PEFT's ``ModulesToSaveWrapper`` (LongLoRA's trainable copy of tied embeddings). Parameters that
    are not ordinary local tensors (DeepSpeed ZeRO-3 partitions, FSDP's DTensors, quantized weights) are left
    to the module's own forward.
    """
    if isinstance(head, ModulesToSaveWrapper):
        active = head.active_adapters
        if head.disable_adapters or not active or any(name not in head.modules_to_save for name in active):
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    if type(head) is not torch.nn.Linear:
        return None
    for p in head.parameters():
        if type(p) is not torch.nn.Parameter or hasattr(p, "ds_id") or not p.is_floating_point():
            return None
    return head


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(hidden @ W^T + b, targets)) / normaliser``; the gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, normaliser, chunk_size):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) with -100 = no loss
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        # the products run in autocast's dtype where autocast would cast them; else in the lower of the two dtypes
        # (fp32 hidden states next to a bf16 head are a bf16 model's outputs that accelerate converted to fp32)
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        if autocast and hidden.dtype == torch.float32:
            product_dtype = torch.get_autocast_dtype(device)
        elif hidden.dtype == torch.float32 and weight.dtype in (torch.bfloat16, torch.float16):
            product_dtype = weight.dtype
        else:
            product_dtype = hidden.dtype
        logits_dtype = _loss_dtype(product_dtype)
        if autocast:
            # the model's forward is over: drop the low-precision copies autocast keeps of trainable weights until
            # its region ends (the head's among them; every weight's under full fine-tuning), before the gradient
            # buffers below exist
            torch.clear_autocast_cache()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (N, H)
        grad_weight = (
            torch.zeros_like(weight, dtype=_loss_dtype(weight.dtype)) if need_weight else None
        )  # (V, H)
        grad_bias = torch.zeros_like(bias, dtype=_loss_dtype(bias.dtype)) if need_bias else None  # (V,)
        total = hidden.new_zeros((), dtype=_loss_dtype(hidden.dtype))
        # fp32/fp64: whole-chunk products. bf16/fp16: a vocabulary slice at a time, the head's slice cast when used,
        # so that besides the chunk's fp32 logits only slice-sized low-precision tensors exist
        low_precision = logits_dtype != product_dtype
        vocab = weight.size(0)
        step = _VOCAB_SLICE if low_precision else vocab
        slices = [(v, min(v + step, vocab)) for v in range(0, vocab, step)]

        def head_slice(v0, v1):
            return weight[v0:v1].to(product_dtype), None if bias is None else bias[v0:v1].to(product_dtype)

        # a head in the products' dtype is used as it is (a view); one that must be cast, or whose gradient is made,
        # is used in quarter slices, so that its cast copy and gradient product stay small
        part = _CAST_SLICE if (weight.dtype != product_dtype or need_weight) else step

        def parts(v0, v1):
            return [(a, min(a + part, v1)) for a in range(v0, v1, part)]

        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.size(0), chunk_size):
                h = hidden[start : start + chunk_size].to(product_dtype)  # (n, H)
                t = targets[start : start + chunk_size]  # (n,)
                if low_precision:
                    logits = h.new_empty((h.size(0), vocab), dtype=logits_dtype)  # (n, V)
                    for v0, v1 in slices:
                        for a, b in parts(v0, v1):
                            logits[:, a:b] = F.linear(h, *head_slice(a, b))  # (n, b - a)
                else:
                    logits = F.linear(
                        h, weight.to(product_dtype), None if bias is None else bias.to(product_dtype)
                    )
                labelled = t != IGNORE_INDEX  # (n,)
                safe = t.clamp(min=0).unsqueeze(1)  # (n, 1)
                picked = logits.gather(1, safe).squeeze(1)  # (n,)
                # one exp over the chunk serves the loss and its gradient; the logits' memory is reused
                row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                probs = logits.sub_(row_max).exp_()  # (n, V), unnormalised
                row_sum = probs.sum(dim=-1, keepdim=True)  # (n, 1)
                log_z = (row_max + row_sum.log()).squeeze(1)  # (n,)
                total += ((log_z - picked) * labelled).sum()
                if not (need_hidden or need_weight or need_bias):
                    del logits, probs
                    continue
                # d loss / d logits = (softmax - onehot) / normaliser on labelled rows, 0 elsewhere
                weight_of_row = (labelled.to(probs.dtype) / normaliser).unsqueeze(1)  # (n, 1)
                probs.mul_(weight_of_row / row_sum).scatter_add_(1, safe, -weight_of_row)  # (n, V)
                if need_bias:
                    grad_bias += probs.sum(0)
                if not low_precision:
                    if need_hidden:
                        grad_hidden[start : start + chunk_size] = probs @ weight  # (n, H)
                    if need_weight:
                        grad_weight += probs.t() @ h  # (V, H)
                    del logits, probs  # before the next chunk's logits exist
                    continue
                grad_h = torch.zeros_like(h, dtype=logits_dtype) if need_hidden else None  # (n, H)
                for v0, v1 in slices:
                    g = probs[:, v0:v1].to(product_dtype)  # (n, v)
                    for a, b in parts(v0, v1):
                        g_part = g[:, a - v0 : b - v0]  # (n, b - a)
                        if need_hidden:
                            grad_h += g_part @ head_slice(a, b)[0]  # (n, H)
                        if need_weight:
                            grad_weight[a:b] += g_part.t() @ h  # (b - a, H)
                    del g, g_part  # the view too: it would keep g's memory into the next chunk's logits
                if need_hidden:
                    grad_hidden[start : start + chunk_size] = grad_h
                del logits, probs  # before the next chunk's logits exist
        # kept on ctx, not saved for backward: the backward scales them in place and hands them over, so no copy
        # of the (V, H) head gradient is made and autograd can accumulate into it
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total / normaliser

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused chunked loss's backward runs once (its gradients are handed over, not copied); "
                "use chunked_causal_lm_loss(..., fused=False) to backpropagate through it more than once"
            )
        grads, ctx.grads = ctx.grads, None
        scale = _upcast(grad_loss)
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else g.mul_(scale.to(g.dtype)) for g in grads
        )  # fmt: skip
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(ctx.weight_dtype),
            None if grad_bias is None else grad_bias.to(ctx.weight_dtype),
            None,
            None,
            None,
        )


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fused: bool | None = None,
) -> torch.Tensor:
    """``ForCausalLMLoss(head(hidden_states), labels, ...)`` computed ``chunk_size`` tokens at a time.

    Args:
        hidden_states: ``(batch, seq, hidden)``, the model's last hidden states (after the final norm).
        head: the LM head module.
        labels: ``(batch, seq)`` token ids, ``-100`` where no loss is taken; shifted by one here.
        shift_labels: already shifted labels (instead of ``labels``).
        num_items_in_batch: when given, the loss is the sum divided by it (the trainer's gradient-accumulation
            normalisation); else the mean over the labelled tokens.
        chunk_size: tokens per chunk (the fused path holds about ``chunk_size * vocab * 6`` bytes at once: the
            chunk's fp32 logits and, in bf16/fp16, one low-precision copy of their gradient).
        fused: compute the gradients in the forward (no recompute); ``None`` = whenever the head is a plain
            ``nn.Linear`` (see the module docstring), ``False`` = always the checkpointed chunks, ``True`` =
            raise if the head is not a plain linear layer.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("give labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden = hidden_states.reshape(-1, hidden_states.size(-1))
    targets = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        normaliser = (targets != IGNORE_INDEX).sum()  # 0 / 0 = nan without labels, like the plain loss
    else:
        normaliser = torch.as_tensor(num_items_in_batch, device=hidden.device)
    linear = _plain_linear(head) if fused is not False else None
    if fused and linear is None:
        raise ValueError(f"fused=True needs a plain nn.Linear LM head, got {type(head).__name__}")
    if linear is not None:
        return _FusedLinearCrossEntropy.apply(
            hidden, linear.weight, linear.bias, targets, _upcast(normaliser), chunk_size
        )
    total = hidden.new_zeros((), dtype=_loss_dtype(hidden.dtype))
    for start in range(0, hidden.size(0), chunk_size):
        labels_chunk = targets[start : start + chunk_size]
        hidden_chunk = hidden[start : start + chunk_size]
        if torch.is_grad_enabled() and (
            hidden_chunk.requires_grad or any(p.requires_grad for p in head.parameters())
        ):
            total = total + checkpoint(_chunk_loss, head, hidden_chunk, labels_chunk, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hidden_chunk, labels_chunk)
    return total / normaliser


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    """Whether :func:`causal_lm_loss` reproduces the model's loss: a causal LM whose logits are ``head(hidden)``."""
    config = getattr(model, "config", None)
    if config is None or model.get_output_embeddings() is None:
        return False
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        # a scale or multiplier of 1.0 changes nothing; any soft-cap does (1.0 squeezes logits into (-1, 1))
        neutral = (None,) if name.endswith("softcapping") else (None, 1.0)
        if value not in neutral:
            return False
    return True


def causal_lm_loss(
    model: torch.nn.Module,
    inputs: dict,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fused: bool | None = None,
) -> torch.Tensor:
    """The loss of ``model(**inputs)`` (``inputs`` with ``labels``) without building the full logits.

    ``model`` is called as such (a PeftModel, DDP, ...), with ``logits_to_keep=1`` and ``output_hidden_states=True``;
    the LM head is looked up on the unwrapped model.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    shift_labels = inputs.pop("shift_labels", None)
    outputs = model(**inputs, logits_to_keep=1, output_hidden_states=True, use_cache=False)
    hidden = outputs.hidden_states[-1]
    # drop the one-token logits now: their graph holds the head's weight (its bf16 copy under autocast)
    del outputs
    unwrapped = getattr(model, "module", model)  # DDP
    return chunked_causal_lm_loss(
        hidden,
        unwrapped.get_output_embeddings(),
        labels,
        shift_labels=shift_labels,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        fused=fused,
    )


class ChunkedLossTrainer(
    SequenceParallelMixin, FirstStepLearnsMixin, ResumeFromCompleteCheckpointMixin, Trainer
):
    """transformers' ``Trainer`` whose causal-LM loss never holds the whole sequence's logits.

    Same loss, gradients and gradient-accumulation semantics as ``Trainer.compute_loss`` (``num_items_in_batch``,
    ``average_tokens_across_devices``); it falls back to it for label smoothing, a ``compute_loss_func``,
    ``return_outputs`` (evaluation needing logits), batches without labels and models with logit transforms.
    """

    loss_chunk_size: int = DEFAULT_CHUNK_SIZE

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pc = getattr(self.accelerator, "parallelism_config", None)
        if (
            return_outputs
            or "labels" not in inputs
            or self.label_smoother is not None
            or self.compute_loss_func is not None
            or (pc is not None and pc.sp_enabled)
            or not supports_chunked_loss(self.accelerator.unwrap_model(model))
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # as in Trainer.compute_loss: the model only sees num_items_in_batch when it accepts loss kwargs
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        # accelerate autocasts only the model's forward (and converts its outputs to fp32): the LM head, which here
        # runs after it, gets the same autocast, as it would inside the model
        with self.accelerator.autocast():
            loss = causal_lm_loss(model, inputs, items, chunk_size=self.loss_chunk_size)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            loss_scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss
