"""Training with one sequence split across ranks (DeepSpeed's Ulysses, see :mod:`hf_longlora.attention.ulysses`).

Each rank holds ``L / sp`` consecutive tokens of the same batch. What the training loop needs besides the
attention:

- :func:`shard_batch`: the labels shifted over the **whole** sequence first (the label of a rank's last token is
  the next rank's first token), ``position_ids`` kept (they mark the documents), padded to a multiple of ``sp``
  with a padding document of its own, then the rank's slice;
- :func:`sequence_parallel_loss`: the token-weighted mean over the whole sequence: each rank's summed loss divided
  by the token count of all ranks. Rank ``r``'s backward then gives its share of the gradient; the sum over the
  ranks of the sequence is the full gradient (:func:`sum_gradients`, or DDP's mean scaled by ``sp``).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels_of(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` labels for next-token prediction: token t predicts t + 1, except across a document border
    (where ``position_ids`` restart) and after the last token."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, L)
    restarts = F.pad(position_ids[:, 1:] != position_ids[:, :-1] + 1, (0, 1), value=True)
    return shifted.masked_fill(restarts, IGNORE_INDEX)


def shard_batch(
    batch: dict, rank: int, world_size: int, pad_token_id: int = 0, stop_at_documents: bool = True
) -> dict:
    """This rank's slice of a ``(B, L)`` batch with ``input_ids``, ``position_ids`` and ``labels`` (or
    ``shift_labels``); the result has ``input_ids``, ``position_ids`` and ``shift_labels``, each ``(B, L' / sp)``.

    ``stop_at_documents``: no label across a document border (where ``position_ids`` restart); ``False``: the
    plain shift of transformers' loss, as without parallelism.

    ``L`` is padded up to ``L'``, a multiple of ``world_size``: the padding is a document of its own (its
    positions restart at 0) whose labels are ignored, so the real tokens' attention and loss do not change."""
    for key in ("input_ids", "position_ids"):
        if key not in batch:
            raise ValueError(
                f"a sequence-parallel batch needs {key!r} (position_ids mark the documents, as the mask is dropped)"
            )
    input_ids, position_ids = batch["input_ids"], batch["position_ids"].expand_as(batch["input_ids"])
    if "shift_labels" in batch:
        shift = batch["shift_labels"]
    elif stop_at_documents:
        shift = shift_labels_of(batch.get("labels", input_ids), position_ids)
    else:  # transformers' plain shift (ForCausalLMLoss): the collator's labels decide the borders
        shift = F.pad(batch.get("labels", input_ids)[:, 1:], (0, 1), value=IGNORE_INDEX)
    length = input_ids.shape[1]
    pad = -length % world_size
    if pad:
        rows = input_ids.shape[0]
        input_ids = torch.cat([input_ids, input_ids.new_full((rows, pad), pad_token_id)], dim=1)
        position_ids = torch.cat(
            [position_ids, torch.arange(pad, dtype=position_ids.dtype).expand(rows, pad)], dim=1
        )
        shift = torch.cat([shift, shift.new_full((rows, pad), IGNORE_INDEX)], dim=1)
    chunk = input_ids.shape[1] // world_size
    part = slice(rank * chunk, (rank + 1) * chunk)
    return {
        "input_ids": input_ids[:, part],
        "position_ids": position_ids[:, part],
        "shift_labels": shift[:, part],
    }


def sequence_parallel_loss(
    logits: torch.Tensor, shift_labels: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss to backward, mean loss of the whole sequence)`` for this rank's ``(B, l, V)`` logits.

    The first is this rank's summed token losses over the token count of every rank of ``group`` (so the ranks'
    gradients add up to the gradient of the whole sequence's mean); the second, detached, is that mean itself
    (the same on every rank), for logging."""
    summed = F.cross_entropy(
        logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    counts = torch.stack([(shift_labels != IGNORE_INDEX).sum().to(summed.dtype), summed.detach()])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, group=group)
    tokens = counts[0].clamp(min=1)
    return summed / tokens, counts[1] / tokens


def sum_gradients(model: torch.nn.Module, group=None) -> None:
    """Add up the trainable parameters' gradients over the ranks of ``group`` (one sequence's ranks)."""
    for param in model.parameters():
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, group=group)


def check_sequence_parallel_launch(sequence_parallel_size: int, config=None) -> None:
    """Before any weights load: the launch has a multiple of ``sequence_parallel_size`` processes, DeepSpeed is
    installed, and (given the model's config) its heads split over the ranks."""
    from ..attention.ulysses import check_sequence_parallel_model, is_deepspeed_available

    if config is not None:  # the config as it will be loaded
        config = copy.copy(config)
        config._attn_implementation = "s2_attention"
        check_sequence_parallel_model(config, sequence_parallel_size)
    elif not isinstance(sequence_parallel_size, int) or sequence_parallel_size < 1:
        raise ValueError(f"sequence_parallel_size must be an integer >= 1, got {sequence_parallel_size!r}")
    if sequence_parallel_size == 1:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % sequence_parallel_size:
        raise ValueError(
            f"sequence_parallel_size={sequence_parallel_size} needs a multiple of {sequence_parallel_size} processes, "
            f"got {world}: start with `accelerate launch --num_processes {sequence_parallel_size} -m hf_longlora.cli "
            "...` (or torchrun)"
        )
    if not is_deepspeed_available():
        raise ImportError("sequence_parallel_size > 1 needs DeepSpeed: pip install 'hf-longlora[deepspeed]'")


class SequenceShardingLoader:
    """Ulysses' data path, as DeepSpeed's ``UlyssesSPDataLoaderAdapter`` does it: the ranks of a sequence each draw
    a batch, then process them one after the other together, each rank holding its slice (:func:`shard_batch`,
    transformers' plain label shift), so ``len`` is the wrapped loader's times ``sp``.

    Ours because DeepSpeed's adapter all-gathers the batches as tensors of each rank's length, which gloo refuses
    when the lengths differ (SFT records: "ProcessGroupGloo::allgather: invalid tensor size"); the batches travel
    as objects here. The ranks stop together when any of them runs out."""

    def __init__(self, loader, pad_token_id: int = 0) -> None:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        self.loader = loader
        self.pad_token_id = pad_token_id
        self.group = mpu.get_sequence_parallel_group()
        self.rank = mpu.get_sequence_parallel_rank()
        self.world = mpu.get_sequence_parallel_world_size()
        self.pending: list[dict] = []

    def __len__(self) -> int:
        return len(self.loader) * self.world

    def __getattr__(self, name):  # sampler, dataset, set_epoch, ...: the wrapped loader's
        return getattr(self.loader, name)

    def __iter__(self):
        self.pending = []
        iterator = iter(self.loader)
        while True:
            if not self.pending:
                mine = next(iterator, None)
                if mine is not None:
                    mine = {k: v.cpu() if torch.is_tensor(v) else v for k, v in mine.items()}
                batches = [None] * self.world
                torch.distributed.all_gather_object(batches, mine, group=self.group)
                if any(b is None for b in batches):
                    return
                self.pending = batches
            batch = self.pending.pop(0)
            yield shard_batch(batch, self.rank, self.world, self.pad_token_id, stop_at_documents=False)


class SequenceParallelMixin:
    """Trainer mixin: with ``sequence_parallel_size > 1``, the training batches go through
    :class:`SequenceShardingLoader` (each rank gets its slice of one sequence, with ``shift_labels``) and the loss is
    the sequence's token-weighted mean (:func:`sequence_parallel_loss`'s rule, in chunks: no full logits).

    The returned loss is that rank's share times ``sequence_parallel_size``: DDP averages the gradients over the
    processes, so the ranks of one sequence add up to its full gradient (and the logged mean is the sequence's)."""

    sequence_parallel_size: int = 1

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self.sequence_parallel_size == 1:
            return loader
        return SequenceShardingLoader(loader, getattr(self.processing_class, "pad_token_id", None) or 0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.sequence_parallel_size == 1 or return_outputs or "shift_labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        from .loss import causal_lm_loss

        tokens = (inputs["shift_labels"] != IGNORE_INDEX).sum()
        torch.distributed.all_reduce(tokens, group=mpu.get_sequence_parallel_group())
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        loss = causal_lm_loss(model, inputs, num_items_in_batch=tokens.clamp(min=1))  # this rank's share
        return loss * self.sequence_parallel_size


class SequenceParallelCollator:
    """Wraps a padding-free collator (one row of packed sequences with ``position_ids``) for Ulysses: the label of
    each document's first token is ignored (so the data adapter's plain shift never predicts across a border), the
    row is padded to a multiple of ``sequence_parallel_size`` with a padding document of its own, and the
    attention mask is dropped (Ulysses drops it too; the documents are in ``position_ids``)."""

    def __init__(self, collator, sequence_parallel_size: int, pad_token_id: int = 0) -> None:
        self.collator = collator
        self.sequence_parallel_size = sequence_parallel_size
        self.pad_token_id = pad_token_id

    def __call__(self, features):
        batch = dict(self.collator(features))
        batch.pop("attention_mask", None)
        ids = batch["input_ids"]  # (B, L)
        if "position_ids" not in batch:
            raise ValueError(
                "sequence parallelism needs padding-free batches with position_ids (padding_free: true)"
            )
        positions = batch["position_ids"].expand_as(ids)
        labels = batch.get("labels", ids.clone())
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        labels = labels.masked_fill(starts, IGNORE_INDEX)
        pad = -ids.shape[1] % self.sequence_parallel_size
        if pad:
            rows = ids.shape[0]
            ids = torch.cat([ids, ids.new_full((rows, pad), self.pad_token_id)], dim=1)
            positions = torch.cat(
                [positions, torch.arange(pad, dtype=positions.dtype).expand(rows, pad)], dim=1
            )
            labels = torch.cat([labels, labels.new_full((rows, pad), IGNORE_INDEX)], dim=1)
        batch.update(input_ids=ids, position_ids=positions, labels=labels)
        return batch
