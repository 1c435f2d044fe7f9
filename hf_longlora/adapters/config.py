"""LongLoraConfig: LoRA plus trainable embeddings and norms, as one PEFT config.

The paper's key finding (Chen et al., 2024, Table 2, Llama-2 7B extended to 32k, PG19 perplexity): LoRA r=8 alone
11.44; + trainable norms 10.49; + trainable embeddings 8.29; + both 8.12; full fine-tuning 8.08. The config expands
into PEFT's own ``modules_to_save`` so an adapter saved with it also loads with plain PEFT.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from peft import LoraConfig
from peft.utils import CONFIG_NAME

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class LongLoraConfig(LoraConfig):
    """LoRA with LongLoRA's defaults (r=8, alpha=16, dropout 0, q/k/v/o) and trainable embeddings and norms.

    ``modules_to_save`` is extended with ``embedding_module_names`` and ``norm_module_names`` (PEFT matches them as
    name suffixes: ``"norm"`` catches ``input_layernorm``, ``post_attention_layernorm`` and the final ``norm`` of
    Llama, Mistral and Qwen2). The context fields are filled by :func:`hf_longlora.get_longlora_model` from the
    model, saved in ``adapter_config.json`` and used to restore the context extension when the adapter is loaded.
    """

    task_type: str | None = field(
        default="CAUSAL_LM", metadata={"help": "PEFT task type; CAUSAL_LM gives a PeftModelForCausalLM."}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank (LongLoRA: 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (LongLoRA: 16)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (LongLoRA: 0)."})
    target_modules: list[str] | str | None = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "Modules that get LoRA adapters (LongLoRA: the attention projections q, k, v, o)."},
    )
    trainable_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Train the input embeddings in full (the paper: PG19 ppl 10.49 -> 8.12 at 32k with norms)."
        },
    )
    trainable_norms: bool = field(
        default=True,
        metadata={"help": "Train every normalisation layer in full (the paper: 11.44 -> 10.49)."},
    )
    embedding_module_names: list[str] = field(
        default_factory=lambda: ["embed_tokens"],
        metadata={"help": "Name suffixes of the input embedding module(s), added to modules_to_save."},
    )
    norm_module_names: list[str] = field(
        default_factory=lambda: ["norm"],
        metadata={
            "help": "Name suffixes of the norm modules, added to modules_to_save ('norm' matches all of "
            "Llama's, Mistral's and Qwen2's norms)."
        },
    )
    context_length: int | None = field(
        default=None, metadata={"help": "Target context length the adapter was trained for (recorded)."}
    )
    original_context_length: int | None = field(
        default=None, metadata={"help": "The base model's pretraining context length (recorded)."}
    )
    rope_parameters: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "The base model's rope_parameters during training (recorded, restored on load)."},
    )
    s2_attention: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "S2-Attn settings used in training: group_size_ratio, group_size, shift."},
    )
    training_data: list[str] | None = field(
        default=None,
        metadata={"help": "Names of the datasets the adapter was trained on (for the model card)."},
    )
    base_quantization: str | None = field(
        default=None,
        metadata={
            "help": "'nf4' when the base was loaded in 4-bit for training (QLoRA; recorded, read by merge)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("embedding_module_names", "norm_module_names"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be a list of non-empty module name suffixes, got {value!r}")
        saved = list(self.modules_to_save or [])
        for flag, names in (
            ("trainable_embeddings", self.embedding_module_names),
            ("trainable_norms", self.norm_module_names),
        ):
            clash = [m for m in saved if m in names]
            if not getattr(self, flag) and clash:
                raise ValueError(
                    f"{flag}=False contradicts modules_to_save={saved} (it lists {clash}); "
                    f"set {flag}=True or remove them from modules_to_save"
                )
        targets = self.target_modules if isinstance(self.target_modules, (list, set, tuple)) else []
        lora_on_embeddings = [m for m in targets if m in self.embedding_module_names]
        if self.trainable_embeddings and lora_on_embeddings:
            raise ValueError(
                f"target_modules={sorted(targets)} puts LoRA on {lora_on_embeddings} while trainable_embeddings=True "
                "trains them in full; choose one"
            )
        if self.trainable_embeddings and self.trainable_token_indices:
            raise ValueError(
                "trainable_token_indices trains a subset of embedding rows, trainable_embeddings=True trains all of "
                "them; set trainable_embeddings=False to use trainable_token_indices"
            )
        wanted = saved
        if self.trainable_embeddings:
            wanted = wanted + self.embedding_module_names
        if self.trainable_norms:
            wanted = wanted + self.norm_module_names
        self.modules_to_save = list(dict.fromkeys(wanted)) or None
        if self.context_length is not None and (
            not isinstance(self.context_length, int) or self.context_length < 1
        ):
            raise ValueError(f"context_length must be a positive int or None, got {self.context_length!r}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load a LongLoraConfig (with its LongLoRA fields) from an adapter directory.

        Raises:
            FileNotFoundError: no ``adapter_config.json`` in the directory.
            ValueError: the file is not valid JSON, is not a LoRA config, or has keys this class does not know.
        """
        name = os.fspath(pretrained_model_name_or_path)
        path = os.path.join(name, subfolder or "")
        config_file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_file):
            if os.path.isdir(path) or not _looks_like_repo_id(name):
                raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}: not a PEFT adapter directory")
            from huggingface_hub import hf_hub_download

            config_file = hf_hub_download(name, CONFIG_NAME, subfolder=subfolder, **kwargs)
        try:
            with open(config_file, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{config_file} must hold a JSON object")
        return cls.from_dict(data, source=config_file)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LongLoraConfig:
        """Build from a dict (as saved in adapter_config.json), rejecting unknown keys and non-LoRA configs."""
        data = dict(data)
        peft_type = str(data.get("peft_type", "LORA")).split(".")[-1]
        if peft_type != "LORA":
            raise ValueError(
                f"{source}: peft_type is {data.get('peft_type')!r}, LongLoraConfig needs a LoRA config"
            )
        data.pop("runtime_config", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown LongLoraConfig fields {unknown}")
        data.pop("peft_type", None)
        config = cls(**data)
        # made with a LongLoraConfig (its own fields saved), as opposed to a plain LoraConfig read as one
        config.saved_as_longlora = "trainable_embeddings" in data
        return config


def _looks_like_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not os.path.exists(name)
