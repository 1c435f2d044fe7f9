"""merge_and_save: fold a LongLoRA adapter into a standalone checkpoint that plain transformers loads.

The LoRA deltas are added to the projections, the trained embeddings and norms replace the base ones, and the
context extension (``rope_parameters``, ``max_position_embeddings``) is written into config.json, which the
original LongLoRA merge script forgets. The result loads with ``AutoModelForCausalLM.from_pretrained`` without
hf_longlora installed.

From a 4-bit (QLoRA) base: the adapter was trained against the NF4-dequantised weights, so the merge dequantises
the base to its compute dtype (bf16) and adds the deltas there. The merged weights therefore carry NF4's rounding
of the base (they are not the original full-precision weights plus the deltas), and merging in bf16 rounds again:
expect logits to differ from the 4-bit adapter model by bf16 noise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging

from .config import LongLoraConfig
from .lifecycle import check_context_record, load_adapter

logger = logging.get_logger(__name__)
LONGLORA_RECORD = "longlora_adapter_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _check_out_dir(out_dir: Path, overwrite: bool, inputs: dict[str, str]) -> None:
    """``out_dir`` must not be, be inside, or contain an input (``overwrite`` would delete it)."""
    out = out_dir.resolve()
    for name, value in inputs.items():
        if not Path(value).exists():
            continue  # a Hub id
        source = Path(value).resolve()
        if out == source or source in out.parents or out in source.parents:
            relation = "is" if out == source else ("is inside" if source in out.parents else "contains")
            raise ValueError(
                f"out_dir {str(out_dir)!r} {relation} the {name} {value!r}; writing there would replace it "
                "(even with --overwrite): choose another output folder"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"out_dir {str(out_dir)!r} is not empty; pass overwrite=True (--overwrite) to replace it"
        )


def merge_and_save(
    base: str,
    adapter_dir: str,
    out_dir: str,
    *,
    overwrite: bool = False,
    from_4bit: bool | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
    context_length: int | None = None,
    rope_method: str = "linear",
) -> Path:
    """Merge ``adapter_dir`` into ``base`` and save a standalone safetensors checkpoint in ``out_dir``.

    Args:
        base: the base model the adapter was trained on (path or Hub id).
        adapter_dir: the LongLoRA adapter.
        out_dir: where to write; refused if it exists and is not empty, unless ``overwrite``.
        overwrite: replace a non-empty ``out_dir``. The new checkpoint is written to a temporary directory first,
            so a failure leaves the old contents untouched.
        from_4bit: the adapter was trained on an NF4 base: load the base in 4-bit, dequantise to bf16, merge there
            (the weights the adapter was trained against). None (default): as the adapter records
            (``base_quantization``, written by :func:`get_longlora_model` for a 4-bit base); False merges a QLoRA
            adapter into the full-precision base instead.
        dtype: dtype of the saved weights (default: the base's, bf16 with ``from_4bit``).
        max_shard_size: the largest safetensors shard.
        context_length, rope_method: for an adapter that does not record its context extension (see
            :func:`load_adapter`).

    Returns:
        ``Path(out_dir)``.
    """
    out = Path(out_dir)
    _check_out_dir(out, overwrite, {"base": base, "adapter": adapter_dir})
    record = LongLoraConfig.from_pretrained(adapter_dir)
    check_context_record(record, adapter_dir, context_length)
    if from_4bit is None:
        from_4bit = record.base_quantization == "nf4"
        if from_4bit:
            logger.warning(
                "merge: the adapter was trained on an NF4 (4-bit) base: merging into its dequantised weights "
                "(from_4bit=False / --no-from-4bit merges into the full-precision base instead)"
            )
    supplied = {"context_length": context_length, "rope_method": rope_method} if context_length else {}
    if from_4bit:
        from .loading import load_model

        quantised = load_model(
            base, load_in_4bit=True, attn_implementation="sdpa", activation_checkpointing=False
        )
        base_model = quantised.dequantize()
        base_model = base_model.to(dtype or torch.bfloat16)
        model = load_adapter(base_model, adapter_dir, **supplied)
    else:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = load_adapter(base, adapter_dir, **kwargs, **supplied)
    merged = model.merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        for source in (Path(adapter_dir), Path(base)):
            if source.is_dir() and any((source / f).exists() for f in TOKENIZER_FILES):
                for name in TOKENIZER_FILES:
                    if (source / name).exists():
                        shutil.copy2(source / name, staging / name)
                break
        # the adapter's LongLoRA record (context, S2 settings, trained modules, data) for the model card
        shutil.copy2(Path(adapter_dir) / "adapter_config.json", staging / LONGLORA_RECORD)
        staging.chmod(0o755)  # mkdtemp creates 0700
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
