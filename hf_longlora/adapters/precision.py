"""fp32 master weights for the fully trained modules (embeddings, norms) of a half-precision base.

PEFT upcasts the LoRA matrices of a bf16/fp16 model to fp32 (``autocast_adapter_dtype=True``), but its
``modules_to_save`` copies keep the base's dtype. LongLoRA trains the embeddings and norms through those copies, so
on a model loaded in bf16 their weights, gradients and AdamW state would all be bf16: an AdamW step of lr 2e-5 on a
norm weight near 1.0 is below half of bf16's spacing there (2^-8) and rounds away, so the norms never move.

:func:`upcast_trained_copies` makes those copies fp32 (the master weights; their gradients and optimizer state
follow) and keeps the model's computation as it was: the copy's floating outputs go back to the base's dtype, so
the rest of the model (and its activation memory) still runs in bf16::

    bf16 hidden --> trained norm copy (fp32 weight, fp32 arithmetic) --> [cast bf16] --> bf16 hidden
                                     ^ AdamW updates an fp32 tensor

Under ``torch.autocast`` (``TrainingArguments(bf16=True)``) the copies' matrix products still run in bf16.
"""

from __future__ import annotations

import torch
from peft.utils.other import ModulesToSaveWrapper

HALF_DTYPES = (torch.float16, torch.bfloat16)
NORM_CLASS_SUFFIXES = ("RMSNorm", "LayerNorm", "GroupNorm")


def is_norm(module: torch.nn.Module) -> bool:
    """A normalisation layer: ``nn.LayerNorm`` or any class named ``*RMSNorm`` / ``*LayerNorm`` / ``*GroupNorm``."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(NORM_CLASS_SUFFIXES)


def _cast_floating(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast_floating(v, dtype) for v in value)
    return value


def _inputs_to_weight_dtype(module: torch.nn.Module, args: tuple):
    # the weight's dtype at call time, not fp32: an engine that casts the whole model later (DeepSpeed's bf16
    # mode) leaves a bf16 copy, and its input must then stay bf16
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    return args if weight is None else _cast_floating(args, weight.dtype)


def _outputs_to_base_dtype(module: torch.nn.Module, args: tuple, output):
    return _cast_floating(output, module._longlora_compute_dtype)


def _half_dtype_of(module: torch.nn.Module) -> torch.dtype | None:
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in HALF_DTYPES else None


def upcast_trained_copies(model: torch.nn.Module, adapter_name: str = "default") -> list[str]:
    """Give every ``modules_to_save`` copy of ``adapter_name`` whose base module is bf16/fp16 fp32 weights.

    The copy's forward keeps the base module's interface: its floating outputs are cast to the base module's dtype.
    Embeddings take token ids and norms accept a half-precision input next to an fp32 weight (they compute in fp32
    and round once, as the base module does); any other copy (a tied LM head) gets its floating inputs cast to its weight's dtype (fp32). Copies that are fp32 already (an fp32 base, or a QLoRA base after
    ``prepare_model_for_kbit_training``) are left as they are. Tied copies (``ensure_weight_tying``) share one
    Parameter, which stays shared.

    Returns:
        The names of the wrapped modules whose copies were upcast.
    """
    upcast = []
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or adapter_name not in wrapper.modules_to_save:
            continue
        trained = wrapper.modules_to_save[adapter_name]
        if getattr(trained, "_longlora_compute_dtype", None) is not None:
            continue  # done before (a second call)
        base_dtype = _half_dtype_of(wrapper.original_module)
        if base_dtype is None:
            continue
        trained.float()  # in place: a Parameter shared with a tied copy stays one Parameter
        trained._longlora_compute_dtype = base_dtype
        if not (isinstance(trained, torch.nn.Embedding) or is_norm(trained)):
            trained.register_forward_pre_hook(_inputs_to_weight_dtype)
        trained.register_forward_hook(_outputs_to_base_dtype)
        upcast.append(name)
    return upcast
