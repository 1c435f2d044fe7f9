"""The learning-rate schedule of LongLoRA's recipe: a linear warmup then constant, with no step at learning rate 0.

transformers' ``constant_with_warmup`` gives step ``s`` the factor ``s / warmup``, so the first optimizer step of
every run has learning rate 0 (a 1-step run saves an untouched adapter). Here step ``s`` gets
``min(1, (s + 1) / (warmup + 1))``: the same ramp shifted by one step, so every step learns and the full rate is
reached after ``warmup`` steps, as before. Other scheduler types are transformers' own.

Both trainers also share :class:`ResumeFromCompleteCheckpointMixin`: ``resume_from_checkpoint: true`` resumes from
the newest *complete* checkpoint, never from one that a run killed while saving left half-written.
"""

from __future__ import annotations

import torch
from transformers.trainer_utils import SchedulerType


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based) under a warmup of ``warmup_steps`` steps."""
    return min(1.0, (step + 1) / (warmup_steps + 1))


class FirstStepLearnsMixin:
    """For a transformers ``Trainer`` subclass: ``constant_with_warmup`` without the learning-rate-0 first step."""

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        warmup = self.args.get_warmup_steps(num_training_steps)
        if (
            self.lr_scheduler is None
            and SchedulerType(self.args.lr_scheduler_type) == SchedulerType.CONSTANT_WITH_WARMUP
            and warmup > 0
        ):
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer if optimizer is not None else self.optimizer,
                lambda step: warmup_factor(step, warmup),
            )
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)


class ResumeFromCompleteCheckpointMixin:
    """For a transformers ``Trainer`` subclass: ``train(resume_from_checkpoint=True)`` resumes from the newest
    checkpoint that was saved whole (:func:`hf_longlora.training.callbacks.last_complete_checkpoint`).

    transformers writes each checkpoint straight into ``checkpoint-<step>`` and takes the highest step, so a run
    killed while saving leaves a folder that ``resume_from_checkpoint=True`` would fail on (or half-load). A path
    is used as given."""

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            from .callbacks import last_complete_checkpoint

            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint: true, but output_dir {self.args.output_dir!r} holds no complete "
                    "checkpoint-* folder (one with a readable trainer_state.json)"
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)


def sft_trainer_class():
    """TRL's SFTTrainer with :class:`FirstStepLearnsMixin` and :class:`ResumeFromCompleteCheckpointMixin` (built on
    first use: TRL is imported only for SFT)."""
    global _SFT_TRAINER
    if _SFT_TRAINER is None:
        from trl import SFTTrainer

        from .sequence_parallel import SequenceParallelMixin

        _SFT_TRAINER = type(
            "LongLoraSFTTrainer",
            (SequenceParallelMixin, FirstStepLearnsMixin, ResumeFromCompleteCheckpointMixin, SFTTrainer),
            {},
        )
    return _SFT_TRAINER


_SFT_TRAINER = None
