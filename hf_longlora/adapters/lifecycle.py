"""The adapter lifecycle: wrap a model for LongLoRA, and load a saved adapter back with its context extension.

``get_longlora_model`` is ``peft.get_peft_model`` plus four things: it records the model's context extension and
S2 settings in the config (so they are saved with the adapter), it checks that the embeddings and norms it should
train exist (and that every norm of the model is covered), it keeps tied input/output embeddings tied, and on a
bf16/fp16 base it keeps fp32 master weights for the embeddings and norms it trains (``precision.py``).
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel

from ..attention import S2Settings
from .config import LongLoraConfig
from .context import context_length, original_context_length
from .loading import load_model
from .norms import use_lean_norms
from .precision import is_norm, upcast_trained_copies

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def record_context(config: LongLoraConfig, model: PreTrainedModel) -> LongLoraConfig:
    """Copy the model's context extension and S2 settings into the adapter config (saved with the adapter)."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    config.context_length = context_length(text_config)
    config.original_context_length = original_context_length(text_config)
    params = getattr(text_config, "rope_parameters", None)
    config.rope_parameters = dict(params) if params else None
    quantization = getattr(model.config, "quantization_config", None)
    four_bit = getattr(model, "is_loaded_in_4bit", False) or getattr(quantization, "load_in_4bit", False)
    if isinstance(quantization, dict):
        four_bit = four_bit or bool(quantization.get("load_in_4bit"))
    config.base_quantization = "nf4" if four_bit else None
    s2 = S2Settings.from_config(text_config)
    config.s2_attention = {
        "group_size_ratio": s2.group_size_ratio,
        "group_size": s2.group_size,
        "shift": s2.shift,
    }
    return config


def _ties_embeddings(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def get_longlora_model(
    model: PreTrainedModel,
    peft_config: LongLoraConfig | None = None,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
    *,
    config: LongLoraConfig | None = None,
) -> PeftModel:
    """Wrap ``model`` for LongLoRA training: LoRA on the attention projections, embeddings and norms trained in full.

    The signature is ``peft.get_peft_model``'s and every keyword after ``peft_config`` goes to it unchanged; on top,
    the context extension is recorded in the adapter config and tied embeddings stay tied.

    Args:
        model: the base model (after :func:`extend_context` / :func:`load_model` for a longer context).
        peft_config: a :class:`LongLoraConfig` (default: ``LongLoraConfig()``, the paper's recipe). Not modified.
        adapter_name, mixed, autocast_adapter_dtype, revision, low_cpu_mem_usage: as in ``peft.get_peft_model``.
            ``autocast_adapter_dtype`` (default True) also makes the trained embedding and norm copies of a
            bf16/fp16 base fp32 (see :func:`hf_longlora.adapters.precision.upcast_trained_copies`); PEFT alone
            upcasts only the LoRA matrices, and bf16 AdamW steps on a norm weight round away.
        config: the 0.1.0.dev0 name of ``peft_config`` (deprecated).

    Raises:
        ValueError: the embedding or norm names in ``peft_config`` match nothing, or some norm of the model would
            stay frozen while ``trainable_norms`` is set.
    """
    if config is not None:
        if peft_config is not None:
            raise TypeError("get_longlora_model: pass peft_config, not both peft_config and config")
        warnings.warn(
            "get_longlora_model(config=...) is deprecated: use peft_config=... (PEFT's name)",
            DeprecationWarning,
            stacklevel=2,
        )
        peft_config = config
    config = peft_config
    config = copy.deepcopy(config) if config is not None else LongLoraConfig()  # the caller's stays as it was
    if not isinstance(config, LongLoraConfig):
        raise TypeError(f"peft_config must be a LongLoraConfig, got {type(config).__name__}")
    names = [name for name, _ in model.named_modules()]
    if config.trainable_embeddings:
        input_embeddings = model.get_input_embeddings()
        embedding_names = [n for n, m in model.named_modules() if m is input_embeddings]
        if not any(n.endswith(s) for n in embedding_names for s in config.embedding_module_names):
            raise ValueError(
                f"embedding_module_names={config.embedding_module_names} does not match the model's input embedding "
                f"{embedding_names}; set LongLoraConfig(embedding_module_names=[...])"
            )
    if config.trainable_norms:
        norms = [n for n, m in model.named_modules() if is_norm(m)]
        uncovered = [n for n in norms if not any(n.endswith(s) for s in config.norm_module_names)]
        if not norms or uncovered:
            raise ValueError(
                f"norm_module_names={config.norm_module_names} leaves these norms frozen: {uncovered or 'no norm found'}"
                "; set LongLoraConfig(norm_module_names=[...])"
            )
        overreach = [
            n
            for n in names
            if any(n.endswith(s) for s in config.norm_module_names)
            and n
            and not is_norm(model.get_submodule(n))
        ]
        if overreach:
            raise ValueError(
                f"norm_module_names={config.norm_module_names} also matches non-norm modules {overreach}"
            )
    if config.trainable_embeddings and _ties_embeddings(model):
        # PEFT then trains one tensor shared by the input embeddings and the tied output layer
        config.ensure_weight_tying = True
    record_context(config, model)
    peft_model = get_peft_model(
        model,
        config,
        adapter_name=adapter_name,
        mixed=mixed,
        autocast_adapter_dtype=autocast_adapter_dtype,
        revision=revision,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    if autocast_adapter_dtype:
        upcast_trained_copies(peft_model, adapter_name)
    use_lean_norms(
        peft_model, adapter_name
    )  # the same outputs; the trained norms save less for their backward
    return peft_model


def _read_adapter_tensors_meta(adapter_dir: str) -> dict[str, tuple[int, ...]]:
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {ADAPTER_WEIGHTS} in {adapter_dir!r} (adapters are read from safetensors only)"
        )
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def check_adapter_matches_base(model: torch.nn.Module, adapter_dir: str) -> None:
    """Raise ValueError naming the first adapter tensor whose module is missing from ``model`` or has another shape."""
    shapes = _read_adapter_tensors_meta(adapter_dir)
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under every name
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        for suffix, dim, what in ((".lora_A.weight", 1, "in"), (".lora_B.weight", 0, "out")):
            if name.endswith(suffix):
                module_name = name[: -len(suffix)]
                module = modules.get(module_name)
                if module is None:
                    raise ValueError(f"adapter module {module_name!r} does not exist in the base model")
                weight = getattr(module, "weight", None)
                if isinstance(module, torch.nn.Embedding):
                    expected = module.num_embeddings if what == "in" else module.embedding_dim
                else:
                    expected = getattr(module, f"{what}_features", None)
                    if expected is None and weight is not None:
                        expected = weight.shape[1 if what == "in" else 0]
                if expected != shape[dim]:
                    raise ValueError(
                        f"the adapter was trained on a different base: module {module_name!r} has {what}_features="
                        f"{expected} but the adapter's {suffix[1:]} has shape {list(shape)}"
                    )
                break
        else:
            if ".lora_" in name or ".token_adapter." in name:
                continue  # DoRA magnitudes, trainable-token deltas: PEFT checks them
            param = params.get(name)
            if param is None:
                raise ValueError(
                    f"adapter module {name.rpartition('.')[0]!r} does not exist in the base model (adapter tensor {key!r})"
                )
            if tuple(param.shape) != shape:
                raise ValueError(
                    f"the adapter was trained on a different base: {name!r} has shape {list(param.shape)} in the base "
                    f"but {list(shape)} in the adapter"
                )


def check_context_record(config: LongLoraConfig, adapter_dir: str, context_length: int | None) -> None:
    """An adapter made by plain ``peft.get_peft_model(model, LongLoraConfig())`` saves no context record: loading
    it at the base's native context would silently lose its extension, so it needs ``context_length``."""
    if config.context_length is not None:
        if context_length is not None and context_length != config.context_length:
            raise ValueError(
                f"context_length={context_length} contradicts the adapter's record ({config.context_length} tokens "
                f"in {adapter_dir}); leave context_length out to use the record"
            )
        return
    if context_length is None and getattr(config, "saved_as_longlora", False):
        raise ValueError(
            f"the adapter in {adapter_dir!r} does not record the context it was trained at (it was made with "
            "peft.get_peft_model, not hf_longlora.get_longlora_model): pass context_length=N (--context-length N, "
            "and rope_method / --rope-method if not 'linear') with the context it was trained at, or the base's own "
            "context if it was not extended"
        )


def restore_context(model: PreTrainedModel, config: LongLoraConfig) -> None:
    """Re-apply the context extension and S2 settings recorded in an adapter config to a base model."""
    from ..attention import configure_s2
    from .context import _rebuild_rotary_embeddings

    if config.s2_attention:
        configure_s2(model, **config.s2_attention)
    if not config.rope_parameters or not config.context_length:
        return
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    current = getattr(text_config, "rope_parameters", None)
    if current == config.rope_parameters and context_length(text_config) == config.context_length:
        return
    text_config.rope_parameters = dict(config.rope_parameters)
    if config.original_context_length is not None:
        text_config.original_max_position_embeddings = config.original_context_length
    text_config.longlora_context_length = config.context_length
    dynamic = config.rope_parameters.get("rope_type") == "dynamic"
    text_config.max_position_embeddings = config.original_context_length if dynamic else config.context_length
    _rebuild_rotary_embeddings(model)


def load_adapter(
    base: str | PreTrainedModel,
    adapter_dir: str,
    *,
    is_trainable: bool = False,
    adapter_name: str = "default",
    context_length: int | None = None,
    rope_method: str = "linear",
    **load_model_kwargs: Any,
) -> PeftModel:
    """Load a LongLoRA adapter onto its base, restoring the context extension it was trained with.

    Args:
        base: the base model (path, Hub id or a loaded model).
        adapter_dir: a directory written by ``save_pretrained`` of a LongLoRA PeftModel.
        is_trainable: keep training the adapter (on a bf16/fp16 base the trained embedding and norm copies get fp32
            master weights, as in :func:`get_longlora_model`).
        context_length, rope_method: the context extension the adapter was trained with, for an adapter that does
            not record it (made with ``peft.get_peft_model`` instead of :func:`get_longlora_model`, which records
            it). Such an adapter is refused without them; for one that records it they must agree with the record.
        **load_model_kwargs: for :func:`hf_longlora.load_model` when ``base`` is a path (``dtype``, ``load_in_4bit``, ...).

    Raises before loading any weights: FileNotFoundError (missing adapter files), ValueError (corrupt files,
    unknown config fields, an adapter trained on another base: the first mismatching module and shapes; a
    LongLoraConfig adapter without its context record and no ``context_length``).
    """
    config = LongLoraConfig.from_pretrained(adapter_dir)
    check_context_record(config, adapter_dir, context_length)
    _read_adapter_tensors_meta(adapter_dir)
    if isinstance(base, (str, os.PathLike)):
        # check the adapter against the base's architecture on the meta device, before loading any weights
        from transformers import AutoConfig, AutoModelForCausalLM

        location = {k: load_model_kwargs[k] for k in ("revision", "gguf_file") if k in load_model_kwargs}
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base, **location))
        check_adapter_matches_base(skeleton, adapter_dir)
        del skeleton
        load_model_kwargs.setdefault("attn_implementation", "sdpa" if not is_trainable else "s2_attention")
        load_model_kwargs.setdefault("activation_checkpointing", is_trainable)
        model = load_model(os.fspath(base), **load_model_kwargs)
    else:
        model = base
    if config.context_length is None and context_length is not None:
        from .context import extend_context

        extend_context(model, context_length, rope_method)  # what the caller says the adapter was trained at
    restore_context(model, config)
    check_adapter_matches_base(model, adapter_dir)
    peft_model = PeftModel.from_pretrained(
        model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable, config=config
    )
    if is_trainable:
        upcast_trained_copies(peft_model, adapter_name)  # as get_longlora_model: fp32 master weights
        use_lean_norms(peft_model, adapter_name)
    return peft_model
