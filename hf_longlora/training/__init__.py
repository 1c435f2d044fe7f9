"""Training: LongLoRA's two stages on top of transformers' Trainer and TRL's SFTTrainer.

- ``arguments.py``: the argument dataclasses (LongLoRA's knobs, the corpus, the LongAlpaca data);
- ``recipe.py``: the paper's recipe as defaults, scaled to the model and run; the automatic bf16 choice;
- ``checks.py``: what is checked before any weights load; ``model.py``: load and wrap the model to train;
- ``pretraining.py``: :func:`run_pretraining`; ``sft.py``: :func:`run_sft`;
- ``callbacks.py``: Trainer/TRL callbacks; ``loss.py``: the chunked / fused LM-head loss;
- ``sequence_parallel.py``: one sequence across processes (DeepSpeed's Ulysses): sharding, the loss, the trainer
  mixin;
- ``trl_hook.py``: opt-in registration of ``s2_attention`` inside ``trl sft``'s child process.

It parses no command lines (``hf_longlora.cli`` does) and is imported by nothing below the CLI except
``evaluation``, which uses the chunked loss.
"""

from .arguments import OVERLONG_POLICIES, CorpusArguments, LongLoraArguments, SFTDataArguments
from .callbacks import (
    LongContextEvalCallback,
    NonFiniteLossError,
    S2StateCallback,
    StopOnNonFiniteLossCallback,
    StopOnSignalCallback,
    ThroughputMemoryCallback,
    add_longlora_callbacks,
    checkpoint_is_complete,
    last_complete_checkpoint,
)
from .checks import check_context_extension, check_no_sequence_parallelism, check_optimizer
from .loss import ChunkedLossTrainer, causal_lm_loss, chunked_causal_lm_loss
from .model import load_for_training, longlora_config_from
from .pretraining import run_pretraining
from .recipe import (
    RECIPE_DEFAULTS,
    SFT_GROUP_SIZE,
    accelerator_available,
    bf16_supported,
    recipe_defaults_for,
    scale_recipe,
)
from .sequence_parallel import (
    SequenceParallelCollator,
    SequenceParallelMixin,
    SequenceShardingLoader,
    sequence_parallel_loss,
    shard_batch,
)
from .sft import (
    LLAMA2_PROMPT,
    LLAMA2_PROMPT_WITH_INPUT,
    load_longalpaca,
    longalpaca_to_prompt_completion,
    prepare_sft_dataset,
    run_sft,
)

__all__ = [
    "LLAMA2_PROMPT",
    "LLAMA2_PROMPT_WITH_INPUT",
    "OVERLONG_POLICIES",
    "RECIPE_DEFAULTS",
    "SFT_GROUP_SIZE",
    "ChunkedLossTrainer",
    "CorpusArguments",
    "LongContextEvalCallback",
    "LongLoraArguments",
    "NonFiniteLossError",
    "S2StateCallback",
    "SFTDataArguments",
    "SequenceParallelCollator",
    "SequenceParallelMixin",
    "SequenceShardingLoader",
    "StopOnNonFiniteLossCallback",
    "StopOnSignalCallback",
    "ThroughputMemoryCallback",
    "accelerator_available",
    "add_longlora_callbacks",
    "bf16_supported",
    "causal_lm_loss",
    "check_context_extension",
    "checkpoint_is_complete",
    "check_no_sequence_parallelism",
    "check_optimizer",
    "chunked_causal_lm_loss",
    "last_complete_checkpoint",
    "load_for_training",
    "load_longalpaca",
    "longalpaca_to_prompt_completion",
    "longlora_config_from",
    "prepare_sft_dataset",
    "recipe_defaults_for",
    "run_pretraining",
    "run_sft",
    "scale_recipe",
    "sequence_parallel_loss",
    "shard_batch",
]
