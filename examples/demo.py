"""`make demo`: the whole LongLoRA job on a tiny Llama, offline, on CPU, in a few minutes.

1. Base model: a byte-level BPE tokenizer and a tiny Llama pretrained from scratch at a native context of
   ``--native`` tokens (256) on long prose that ships with every Python (``pydoc_data/topics.py``, ~750k
   characters; the last 5% is held out). Cached in ``<out>/base`` and reused by later runs with the same settings.
2. LongLoRA: ``hf-longlora train`` (the CLI, in process) extends the context ``--factor`` times (4x) with position
   interpolation and trains LoRA on q/k/v/o plus the embeddings and norms with S2-Attn on blocks of the target
   length.
3. Evaluation (``hf_longlora.evaluation``, full attention): perplexity at 1x, 2x and 4x the native context for the
   base, the base with position interpolation alone ("before"), the LongLoRA adapter ("after") and the merged
   model; passkey retrieval at 4x; forgetting at 1x (the held-out text is the base's own domain).
4. Saves the adapter (``<out>/adapter``, with a model card), the merged model (``<out>/merged``), the plots and
   ``<out>/summary.json``, and prints a summary table.

    python examples/demo.py [--out outputs/demo] [--steps 60] [--base-steps 300] [--native 256] [--factor 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from hf_longlora import build_model_card, merge_and_save
from hf_longlora.cli import main as hf_longlora_cli
from hf_longlora.data import pydoc_topics_text, train_bpe_tokenizer
from hf_longlora.data.tokenizer import chunks
from hf_longlora.evaluation import EvalSettings, ModelSpec, evaluate_models, format_table

BASE_SETTINGS_FILE = "demo_base_settings.json"


def build_base(out: Path, train_text: str, args: argparse.Namespace) -> Path:
    """Pretrain the tiny base at its native context (skipped when ``out`` holds one made with the same settings)."""
    settings = {
        "native": args.native,
        "base_steps": args.base_steps,
        "seed": args.seed,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "text_chars": len(train_text),
    }
    marker = out / BASE_SETTINGS_FILE
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"1) base model: reusing {out} (pretrained earlier with the same settings)")
        return out
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(args.seed)
    tokenizer = train_bpe_tokenizer(chunks(train_text, 10_000), args.vocab)
    ids = tokenizer(train_text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i : i + args.native] for i in range(0, len(ids) - args.native + 1, args.native)]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.native,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    print(
        f"1) base model: pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama "
        f"from scratch at its native context of {args.native} tokens ({args.base_steps} steps, "
        f"{len(blocks)} blocks)"
    )
    Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "trainer"),
            max_steps=args.base_steps,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            warmup_steps=args.base_steps // 10,
            lr_scheduler_type="cosine",
            logging_steps=max(1, args.base_steps // 5),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_dict({"input_ids": blocks, "labels": blocks}),
        data_collator=default_data_collator,
    ).train()
    shutil.rmtree(out / "trainer", ignore_errors=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(settings))
    return out


def split_data(args: argparse.Namespace, data_dir: Path) -> tuple[list[Path], list[str]]:
    """Training files and held-out documents: pydoc's prose (last 5% held out) or the stdlib's longest files."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.data == "pydoc":
        text = pydoc_topics_text()
        split = int(0.95 * len(text))
        (data_dir / "train.txt").write_text(text[:split], encoding="utf-8")
        return [data_dir / "train.txt"], [text[split:]]
    from hf_longlora.data import stdlib_documents

    documents = stdlib_documents()
    train = documents[: -args.heldout_files][: args.max_train_files]
    for i, doc in enumerate(train):
        (data_dir / f"train_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return sorted(data_dir.glob("train_*.txt")), documents[-args.heldout_files :]


def write_train_config(
    path: Path, base: str, corpus: list[Path], adapter: Path, target: int, args: argparse.Namespace
) -> Path:
    """The ``hf-longlora train`` config: LongLoRA's recipe, scaled down to a small model on 2 CPU cores."""
    checkpointing = args.activation_checkpointing
    if checkpointing is None:  # short blocks on a tiny model: recomputation costs more than it saves
        checkpointing = target >= 4096
    config = {
        "model_name_or_path": base,
        "corpus": [str(p) for p in corpus],
        "context_length": target,
        "rope_method": "linear",
        "s2_group_size_ratio": 0.25,
        "output_dir": str(adapter),
        "max_steps": args.steps,
        # a few dozen steps, not 1000 x 64 sequences as in the paper: a larger step than 7B's 2e-5
        "learning_rate": args.lr or (2e-4 if args.model else 2e-3),
        "warmup_steps": args.steps // 10,  # no warmup for a handful of steps: the first step would have lr 0
        "gradient_accumulation_steps": 1,
        "activation_checkpointing": checkpointing,
        "logging_steps": max(1, args.steps // 6),
        "save_strategy": "no",
        "use_cpu": True,
        "seed": args.seed,
        "disable_tqdm": True,
        "dtype": "float32",  # bf16 matmuls are slower than fp32 on CPUs without AVX-512 bf16
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/demo", help="output directory")
    parser.add_argument(
        "--model",
        default=None,
        help="skip step 1 and extend this pretrained model instead: a path, or 'smollm2' (offline SmolLM2-135M)",
    )
    parser.add_argument(
        "--data",
        choices=["pydoc", "stdlib"],
        default="pydoc",
        help="pydoc: pydoc_data/topics.py prose (5%% held out); stdlib: the standard library's longest files "
        "(the last --heldout-files held out)",
    )
    parser.add_argument(
        "--heldout-files", type=int, default=8, help="--data stdlib: files held out for evaluation"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="LongLoRA learning rate (default 2e-3, 2e-4 with --model)"
    )
    parser.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on from 4096 tokens",
    )
    parser.add_argument(
        "--target", type=int, default=None, help="target context (default: --factor x the native context)"
    )
    parser.add_argument(
        "--max-train-files",
        type=int,
        default=None,
        help="--data stdlib: use at most this many training files",
    )
    parser.add_argument("--passkey-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument(
        "--no-passkey", action="store_true", help="skip passkey retrieval (slow at long context)"
    )
    parser.add_argument("--skip-merged-eval", action="store_true", help="do not evaluate the merged model")
    parser.add_argument("--native", type=int, default=256, help="the base model's native context")
    parser.add_argument("--factor", type=int, default=4, help="context extension factor")
    parser.add_argument("--base-steps", type=int, default=300, help="pretraining steps at the native context")
    parser.add_argument("--steps", type=int, default=60, help="LongLoRA steps at the extended context")
    parser.add_argument("--hidden", type=int, default=128, help="base model hidden size")
    parser.add_argument("--layers", type=int, default=2, help="base model layers")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--max-windows", type=int, default=24, help="perplexity windows per length")
    parser.add_argument("--passkey-trials", type=int, default=2, help="passkey keys per depth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    corpus, heldout = split_data(args, out / "data")
    if args.model is None:
        train_text = "".join(p.read_text(encoding="utf-8") for p in corpus)
        base = str(build_base(out / "base", train_text, args))
        native = args.native
    else:
        from transformers import AutoConfig

        from hf_longlora.adapters.context import original_context_length
        from hf_longlora.adapters.smollm2 import resolve_model_path

        base = resolve_model_path(args.model)
        native = original_context_length(AutoConfig.from_pretrained(base))
        print(f"1) base model: {args.model} ({base}), native context {native} tokens")
    target = args.target or native * args.factor
    lengths = sorted({native, min(2 * native, target), target})

    seconds = {"base": round(time.perf_counter() - start, 1)}
    adapter = out / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    config = write_train_config(out / "train.yaml", base, corpus, adapter, target, args)
    print(
        f"2) LongLoRA: hf-longlora train --config {config}  ({args.steps} steps at {target} tokens, S2-Attn)"
    )
    if hf_longlora_cli(["train", "--config", str(config)]) != 0:
        raise SystemExit("hf-longlora train failed")

    seconds["longlora"] = round(time.perf_counter() - start - sum(seconds.values()), 1)
    merged = out / "merged"
    merge_and_save(base, str(adapter), str(merged), overwrite=True)

    print(
        f"3) evaluation with full attention: perplexity at {lengths}, "
        f"{'no passkey' if args.no_passkey else f'passkey at {target}'}, forgetting at {native}"
    )
    settings = EvalSettings(
        lengths=lengths,
        max_windows=args.max_windows,
        batch_size=4,
        passkey_lengths=[] if args.no_passkey else [target],
        passkey_trials=args.passkey_trials,
        passkey_depths=args.passkey_depths,
        forgetting_length=native,
        seed=args.seed,
        progress=False,
        extra={
            "data": "pydoc_data/topics.py, last 5% (held out)"
            if args.data == "pydoc"
            else f"the standard library's {args.heldout_files} last long files (held out)"
        },
    )
    specs = [
        ModelSpec(base, label="base"),
        ModelSpec(base, label="before", context_length=target),  # position interpolation alone
        ModelSpec(str(adapter), label="after"),
    ]
    if not args.skip_merged_eval:
        specs.append(ModelSpec(str(merged), label="merged"))
    seconds["merge"] = round(time.perf_counter() - start - sum(seconds.values()), 1)
    results = evaluate_models(specs, heldout, settings, out_dir=out / "eval")
    seconds["eval"] = round(time.perf_counter() - start - sum(seconds.values()), 1)
    models = results["models"]

    summary = {
        "perplexity": {
            stage: {str(n): round(v, 3) for n, v in models[stage]["perplexity"].items()}
            for stage in ("before", "after")
        },
        "passkey": None
        if args.no_passkey
        else {stage: models[stage]["passkey_accuracy"][target] for stage in ("before", "after")},
        "native_context": native,
        "target_context": target,
        "forgetting": {
            "length": native,
            "base": round(models["base"]["forgetting"]["perplexity"], 3),
            "after": round(models["after"]["forgetting"]["perplexity"], 3),
            "change": round(models["after"]["forgetting"]["change_vs_base"], 4),
        },
        "base_perplexity": {str(n): round(v, 3) for n, v in models["base"]["perplexity"].items()},
        "merged_perplexity": (
            {str(n): round(v, 3) for n, v in models["merged"]["perplexity"].items()}
            if "merged" in models
            else None
        ),
        "protocol": results["protocol"],
        "seconds": {**seconds, "total": round(time.perf_counter() - start, 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    # the adapter's model card shows the before/after table
    (adapter / "eval_summary.json").write_text(
        json.dumps({"perplexity": summary["perplexity"], "passkey": summary["passkey"]}, indent=2) + "\n"
    )
    build_model_card(adapter).save(adapter / "README.md")

    print()
    print(format_table(results))
    before, after = summary["perplexity"]["before"][str(target)], summary["perplexity"]["after"][str(target)]
    print()
    print(
        f"perplexity at {target} tokens ({target / native:g}x native): {before:.2f} before (position interpolation alone) -> "
        f"{after:.2f} after LongLoRA; at {native} (forgetting): {summary['forgetting']['base']:.2f} base -> "
        f"{summary['forgetting']['after']:.2f} after ({summary['forgetting']['change']:+.1%})"
    )
    print(
        f"adapter + card: {adapter}   merged: {merged}   plots: {out / 'eval'}   summary: {out / 'summary.json'}"
    )
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"done in {summary['seconds']['total']:.0f} s ({phases})")


if __name__ == "__main__":
    main()
