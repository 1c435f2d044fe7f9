"""Model card and Hub push for LongLoRA adapters and merged models.

The token is never passed around here: ``huggingface_hub.HfApi`` reads it from ``HF_TOKEN`` or the saved login
(``hf auth login``), and nothing in this module prints or logs it.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData

from .config import LongLoraConfig

TAGS = ["longlora", "s2-attn", "lora", "peft", "text-generation"]
EVAL_SUMMARY_FILES = ("eval_summary.json", "summary.json")
LONGLORA_RECORD = "longlora_adapter_config.json"  # written by merge_and_save next to the merged weights
SKIP_PATTERNS = ("checkpoint-*", "runs", "runs/*", "__pycache__", "*/__pycache__/*", "README.md", ".*")


def _is_repo_id(name: str | None) -> bool:
    return (
        bool(name)
        and name.count("/") <= 1
        and not os.path.exists(name)
        and not name.startswith((".", "/", "~"))
    )


def _eval_summary(folder: Path) -> dict[str, Any] | None:
    for name in EVAL_SUMMARY_FILES:
        path = folder / name
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    return None


def _eval_table(summary: dict[str, Any]) -> str:
    lines = []
    perplexity = summary.get("perplexity") or {}
    if perplexity:
        stages = list(perplexity)
        lengths = sorted({int(k) for stage in stages for k in perplexity[stage]})
        lines += ["| context length | " + " | ".join(f"perplexity ({s})" for s in stages) + " |"]
        lines += ["|---|" + "---|" * len(stages)]
        for n in lengths:
            cells = []
            for s in stages:
                value = perplexity[s].get(str(n), perplexity[s].get(n))
                cells.append(f"{value:.2f}" if isinstance(value, (int, float)) else "")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    passkey = summary.get("passkey")
    if passkey:
        lines += ["", "| passkey retrieval | accuracy |", "|---|---|"]
        for stage, value in passkey.items():
            lines.append(
                f"| {stage} | {value:.2%} |" if isinstance(value, (int, float)) else f"| {stage} | {value} |"
            )
    return "\n".join(lines)


def build_model_card(
    folder: str | Path, *, merged: bool = False, base_model: str | None = None, repo_id: str | None = None
) -> ModelCard:
    """A model card for a LongLoRA adapter directory (or a merged checkpoint made from one).

    Metadata: ``library_name`` (peft for an adapter, transformers for a merged model), ``base_model``, tags.
    Body: target context, RoPE scaling, S2-Attn settings, trainable modules, training data, and the evaluation
    table when ``eval_summary.json`` (or ``summary.json``) sits in the folder.
    """
    folder = Path(folder)
    record = folder / ("adapter_config.json" if not merged else LONGLORA_RECORD)
    info: dict[str, Any] = {}
    if record.is_file():
        config = LongLoraConfig.from_dict(json.loads(record.read_text(encoding="utf-8")), source=str(record))
        info = {
            "base_model": base_model or config.base_model_name_or_path,
            "context_length": config.context_length,
            "original_context_length": config.original_context_length,
            "rope_parameters": config.rope_parameters,
            "s2_attention": config.s2_attention,
            "lora": f"r={config.r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, "
            f"target modules {sorted(config.target_modules) if config.target_modules else None}",
            "modules_to_save": config.modules_to_save,
            "training_data": config.training_data,
        }
        if merged:
            model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            info["rope_parameters"] = model_config.get("rope_parameters", info["rope_parameters"])
    elif (folder / "config.json").is_file():
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        info = {
            "base_model": base_model,
            "context_length": model_config.get("longlora_context_length")
            or model_config.get("max_position_embeddings"),
            "original_context_length": model_config.get("original_max_position_embeddings"),
            "rope_parameters": model_config.get("rope_parameters"),
            "s2_attention": {k: v for k, v in model_config.items() if k.startswith("s2_")} or None,
        }
    else:
        raise FileNotFoundError(f"{str(folder)!r} holds neither adapter_config.json nor config.json")

    base = info.get("base_model")
    data = ModelCardData(
        library_name="transformers" if merged else "peft",
        base_model=base if _is_repo_id(base) else None,  # the Hub only links repo ids
        tags=list(TAGS),
        pipeline_tag="text-generation",
    )
    name = repo_id or folder.resolve().name
    body = [
        f"# {name}",
        "",
        f"A {'merged model' if merged else 'LoRA adapter'} trained with [LongLoRA](https://arxiv.org/abs/2309.12307) "
        "(shifted sparse attention, LoRA with trainable embeddings and norms) using hf_longlora.",
        "",
        "## Context extension",
        "",
        f"- base model: {base}"
        + ("" if _is_repo_id(base) else " (a local path; pass base_model= / --base-model)"),
        f"- target context length: {info.get('context_length')} tokens",
        f"- original context length: {info.get('original_context_length')} tokens",
        f"- RoPE scaling: `{json.dumps(info.get('rope_parameters'))}`",
        f"- S2-Attn (training only; inference uses full attention): `{json.dumps(info.get('s2_attention'))}`",
    ]
    if "lora" in info:
        body += [
            "",
            "## Training",
            "",
            f"- LoRA: {info['lora']}",
            f"- trained in full (modules_to_save): {info['modules_to_save']}",
            f"- training data: {', '.join(info['training_data']) if info.get('training_data') else 'not recorded'}",
        ]
    summary = _eval_summary(folder)
    if summary:
        body += ["", "## Evaluation (full attention)", "", _eval_table(summary)]
    body += [
        "",
        "## Usage",
        "",
        "```python",
        "import hf_longlora",
        f"model = hf_longlora.load_adapter({base!r}, {name!r})"
        if not merged
        else f"model = AutoModelForCausalLM.from_pretrained({name!r})  # plain transformers",
        "```",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    return card


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload LongLoRA model",
    commit_description: str | None = None,
    merged: bool = False,
    base_model: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload an adapter directory (or a merged checkpoint, ``merged=True``) with its model card, in one commit.

    The files are uploaded from where they are (no copy) with the generated README.md added; the folder itself is not
    modified. Training checkpoints (``checkpoint-*``), TensorBoard ``runs`` and hidden files are left out.

    Args:
        folder: the adapter directory (``save_pretrained``'s output) or, with ``merged=True``, a merged model.
        repo_id: ``ORG/NAME`` on the Hub.
        token, private, revision, create_pr, commit_message, commit_description: as in ``huggingface_hub``
            (``HfApi.create_repo`` / ``create_commit``). ``private`` applies when the repository is created (None:
            the account's default); ``revision`` is a branch, created from main if it does not exist (unless
            ``create_pr``, which opens a pull request against it).
        merged: the folder is a merged model (``library_name: transformers`` in the card).
        base_model: the base model's Hub id for the card (default: the one recorded in the adapter).
        api: the ``HfApi`` to use (default: a new one with ``token``).

    Returns the commit URL (the pull request's with ``create_pr``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a directory")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'ORG/NAME', got {repo_id!r}")
    if merged and not (folder / "config.json").is_file():
        raise ValueError(
            f"merged=True (--merged): {str(folder)!r} has no config.json (run `hf-longlora merge` first)"
        )
    if not merged and not (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"{str(folder)!r} has no adapter_config.json (pass merged=True / --merged for a merged model)"
        )
    card = build_model_card(folder, merged=merged, base_model=base_model, repo_id=repo_id)
    operations = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
        for rel in sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if not any(
            fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel.split("/")[0], pattern)
            for pattern in SKIP_PATTERNS
        )
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    api = api or HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    commit = api.create_commit(
        repo_id=repo_id,
        repo_type="model",
        operations=operations,
        commit_message=commit_message,
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )
    if create_pr and getattr(commit, "pr_url", None):
        return str(commit.pr_url)
    return str(getattr(commit, "commit_url", commit))
