"""Causal-LM loss without the full-vocabulary logits of the whole sequence.

A causal LM's own loss (``model(..., labels=...)``) builds ``(batch, seq, vocab)`` logits and an fp32 copy of them:
at 32k tokens and a 32k vocabulary that is 4 GiB in fp32, plus as much again for their gradient, more than the
rest of a LongLoRA step. Here the model returns only its last hidden states (``logits_to_keep=1``,
``output_hidden_states=True``) and the LM head and cross-entropy run over ``chunk_size`` tokens at a time, each
chunk under activation checkpointing, so at most one chunk's logits exist at once, in the forward and in the
backward.

The loss and its gradients are the model's own (``transformers.loss.ForCausalLMLoss``): labels shifted by one,
``-100`` ignored, a mean over the labelled tokens, or a sum divided by ``num_items_in_batch`` when the trainer
passes it (gradient accumulation normalised over the whole accumulated batch).

TRL's SFTTrainer already computes its loss this way (its fused LM head), so :func:`hf_longlora.training.run_sft`
needs nothing; :func:`hf_longlora.training.run_pretraining` (transformers' ``Trainer``) uses
:class:`ChunkedLossTrainer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024
# config attributes that change the logits after the LM head: the plain loss is used for such models
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``ForCausalLMLoss(head(hidden_states), labels, ...)`` computed ``chunk_size`` tokens at a time.

    Args:
        hidden_states: ``(batch, seq, hidden)``, the model's last hidden states (after the final norm).
        head: the LM head module (called on each chunk, so LoRA or other wrappers on it apply).
        labels: ``(batch, seq)`` token ids, ``-100`` where no loss is taken; shifted by one here.
        shift_labels: already shifted labels (instead of ``labels``).
        num_items_in_batch: when given, the loss is the sum divided by it (the trainer's gradient-accumulation
            normalisation); else the mean over the labelled tokens.
        chunk_size: tokens per chunk (the peak extra memory is about ``chunk_size * vocab * 10`` bytes).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("give labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.size(-1))
    targets = shift_labels.reshape(-1).to(hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_size):
        labels_chunk = targets[start : start + chunk_size]
        hidden_chunk = hidden[start : start + chunk_size]
        if torch.is_grad_enabled() and (
            hidden_chunk.requires_grad or any(p.requires_grad for p in head.parameters())
        ):
            total = total + checkpoint(_chunk_loss, head, hidden_chunk, labels_chunk, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hidden_chunk, labels_chunk)
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()  # 0 / 0 = nan without labels, like the plain loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    """Whether :func:`causal_lm_loss` reproduces the model's loss: a causal LM whose logits are ``head(hidden)``."""
    config = getattr(model, "config", None)
    if config is None or model.get_output_embeddings() is None:
        return False
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not any(getattr(text_config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS)


def causal_lm_loss(
    model: torch.nn.Module,
    inputs: dict,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The loss of ``model(**inputs)`` (``inputs`` with ``labels``) without building the full logits.

    ``model`` is called as such (a PeftModel, DDP, ...), with ``logits_to_keep=1`` and ``output_hidden_states=True``;
    the LM head is looked up on the unwrapped model.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    shift_labels = inputs.pop("shift_labels", None)
    outputs = model(**inputs, logits_to_keep=1, output_hidden_states=True, use_cache=False)
    unwrapped = getattr(model, "module", model)  # DDP
    return chunked_causal_lm_loss(
        outputs.hidden_states[-1],
        unwrapped.get_output_embeddings(),
        labels,
        shift_labels=shift_labels,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
    )


class ChunkedLossTrainer(Trainer):
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
        loss = causal_lm_loss(model, inputs, items, chunk_size=self.loss_chunk_size)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            loss_scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss
