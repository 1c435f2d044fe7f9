"""S2-Attn under DeepSpeed's Ulysses sequence parallelism (ALST).

Ulysses splits one long sequence across ``sp`` ranks. Around each attention call, DeepSpeed's wrapper
(``deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF``) all-to-alls Q/K/V so that the wrapped
attention function sees the **whole** sequence with ``H / sp`` of the heads, drops the attention mask, and
all-gathers ``position_ids``::

    rank r before:  tokens [r L/sp, (r+1) L/sp), all H heads
    rank r inside:  all L tokens, heads [r H/sp, (r+1) H/sp)        <- s2_attention_forward runs here
    rank r after:   tokens [r L/sp, (r+1) L/sp), all H heads

S2-Attn is exact there when each local head keeps the shift of its **global** index (the first ``H - H // 2``
heads of the model unshifted, as without parallelism, wherever the boundary falls between ranks) and the documents
come from the gathered ``position_ids``: :func:`register_s2_ulysses` wraps our own ``s2_attention`` entry, never a
built-in name, so ``sdpa`` and the rest are untouched in the process.

Why not accelerate's ``ParallelismConfig(sp_backend="deepspeed")``: its ``DeepSpeedSequenceParallelConfig`` only
accepts ``sdpa``, ``flash_attention_2/3`` or hub kernels as ``sp_attn_implementation``, and would then re-register
that built-in name for the whole process. We call DeepSpeed's API directly instead (training/sequence_parallel.py
drives it from the Trainer).
"""

from __future__ import annotations

import importlib.util

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .backend import S2_ATTENTION, s2_attention_forward


def is_deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def check_sequence_parallel_model(config, sequence_parallel_size: int) -> None:
    """Refuse, before any work, a model or size that Ulysses with S2-Attn cannot run, naming what is allowed."""
    if not isinstance(sequence_parallel_size, int) or isinstance(sequence_parallel_size, bool):
        raise ValueError(f"sequence_parallel_size must be an integer >= 1, got {sequence_parallel_size!r}")
    if sequence_parallel_size < 1:
        raise ValueError(f"sequence_parallel_size must be >= 1, got {sequence_parallel_size}")
    if sequence_parallel_size == 1:
        return
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % sequence_parallel_size:
        divisors = [
            n for n in range(2, heads + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)
        ]
        raise ValueError(
            f"sequence_parallel_size={sequence_parallel_size} must divide the model's {heads} attention heads "
            f"(Ulysses gives each rank heads / sequence_parallel_size of them); sizes that fit: {divisors}"
        )
    if kv_heads % sequence_parallel_size and sequence_parallel_size % kv_heads:
        raise ValueError(
            f"sequence_parallel_size={sequence_parallel_size} and the model's {kv_heads} key/value heads: one must "
            "divide the other (DeepSpeed's Ulysses splits or replicates the KV heads)"
        )
    if getattr(config, "_attn_implementation", None) != S2_ATTENTION:
        raise ValueError(
            "sequence parallelism with S2-Attn needs the model loaded with attn_implementation='s2_attention', got "
            f"{getattr(config, '_attn_implementation', None)!r}"
        )


def _s2_on_local_heads(module, query, key, value, attention_mask, **kwargs):
    """``s2_attention_forward`` on this rank's slice of the heads (what Ulysses hands the wrapped function)."""
    if module.training:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        rank, world = mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size()
        local = query.shape[1]  # (B, H / sp, L, D)
        kwargs["global_heads"] = (rank * local, local * world)
    return s2_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_s2_ulysses(model, sequence_parallel_size: int, micro_batch_size: int = 1):
    """Run this process's ``s2_attention`` under DeepSpeed's Ulysses with ``sequence_parallel_size`` ranks.

    Needs ``torch.distributed`` initialised (``accelerate launch`` / ``torchrun``; gloo works on CPU). Every
    model of the process that uses ``s2_attention`` is then sequence-parallel in training (evaluation runs without
    it: each rank sees whole sequences). Batches must carry ``position_ids`` (the documents) and be sharded along
    the sequence, e.g. by ``UlyssesSPDataLoaderAdapter``. Returns DeepSpeed's ``parallel_state_sp`` module (the
    groups), or ``None`` when ``sequence_parallel_size == 1``. :func:`unregister_s2_ulysses` undoes it.
    """
    check_sequence_parallel_model(model.config, sequence_parallel_size)
    if sequence_parallel_size == 1:
        return None
    if not is_deepspeed_available():
        raise ImportError("sequence_parallel_size > 1 needs DeepSpeed: pip install 'hf-longlora[deepspeed]'")
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "sequence_parallel_size > 1 needs torch.distributed initialised: start with accelerate launch or torchrun"
        )
    if torch.distributed.get_world_size() % sequence_parallel_size:
        raise ValueError(
            f"sequence_parallel_size={sequence_parallel_size} must divide the number of processes "
            f"({torch.distributed.get_world_size()})"
        )
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    if not deepspeed.comm.is_initialized():  # DeepSpeed's groups go through deepspeed.comm: wrap torch's
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)

    # DeepSpeed wraps what the name it is given maps to, and puts its wrapper in ALL_ATTENTION_FUNCTIONS' local
    # mapping (which models read first): map our own name to the per-rank function there, never a built-in one
    ALL_ATTENTION_FUNCTIONS[S2_ATTENTION] = _s2_on_local_heads
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=S2_ATTENTION,
        sequence_parallel_size=sequence_parallel_size,
        micro_batch_size=micro_batch_size,
        seq_length_is_variable=True,
        disable_in_eval=True,
    )


def unregister_s2_ulysses() -> None:
    """Put the plain ``s2_attention`` back (no sequence parallelism)."""
    ALL_ATTENTION_FUNCTIONS._local_mapping.pop(S2_ATTENTION, None)


def is_s2_ulysses_active() -> bool:
    return S2_ATTENTION in ALL_ATTENTION_FUNCTIONS._local_mapping
