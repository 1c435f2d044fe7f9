"""A real pretrained model through LongLoRA: SmolLM2-135M (8,192 positions) to 16k with position interpolation x2.

1. ``hf-longlora train``: SmolLM2-135M (the offline GGUF, dequantised), ``context_length`` 16,384 (linear position
   interpolation, factor 2), S2-Attn with groups of 1/4, LoRA r=8 + embeddings + norms, on the CPython standard
   library's long files (the last ``--heldout-files`` held out), ``--steps`` steps of one 16k block; bf16 where the
   CPU has it, activation checkpointing.
2. Evaluation with full attention on the held-out files: perplexity at 8k and 16k (``--windows`` non-overlapping
   windows per length) and passkey retrieval at 16k, for position interpolation alone and after LongLoRA.

This is a benchmark, not a CI test: one 16k step of a 135M model takes minutes on 2 CPU cores. ``--quick`` runs the
same code on a given small model at short lengths (the smoke test).

    python benchmarks/smollm2_16k.py --steps 8 --out outputs/smollm2_16k
    python benchmarks/smollm2_16k.py --quick --model DIR --target 256   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="'smollm2' (offline SmolLM2-135M) or a model path")
    parser.add_argument("--target", type=int, default=16384, help="target context (2x SmolLM2's 8192)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--heldout-files", type=int, default=4)
    parser.add_argument("--windows", type=int, default=2, help="perplexity windows per length")
    parser.add_argument("--passkey-trials", type=int, default=1, help="keys per depth (depths 0, 0.5, 1)")
    parser.add_argument("--out", default="outputs/smollm2_16k")
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 window, 1 passkey depth")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.windows = 2, 1
    from transformers import AutoConfig

    from hf_longlora.adapters.context import original_context_length
    from hf_longlora.adapters.smollm2 import resolve_model_path
    from hf_longlora.cli import main as hf_longlora_cli
    from hf_longlora.data import stdlib_documents
    from hf_longlora.evaluation import EvalSettings, ModelSpec, evaluate_models, format_table

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_model_path(args.model)
    native = original_context_length(AutoConfig.from_pretrained(base))
    documents = stdlib_documents()
    train, heldout = documents[: -args.heldout_files], documents[-args.heldout_files :]
    data = out / "data"
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in train), encoding="utf-8"
    )
    bf16 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    config = {
        "model_name_or_path": base,
        "corpus": [str(data / "train.jsonl")],
        "context_length": args.target,
        "rope_method": "linear",
        "s2_group_size_ratio": 0.25,
        "output_dir": str(out / "adapter"),
        "overwrite_output_dir": True,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "gradient_accumulation_steps": 1,
        "activation_checkpointing": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "dtype": "bfloat16" if bf16 else "float32",
        "no_progress": True,
    }
    (out / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(
        f"training: hf-longlora train --config {out / 'train.yaml'} ({args.steps} steps of {args.target} tokens)"
    )
    if hf_longlora_cli(["train", "--config", str(out / "train.yaml")]) != 0:
        raise SystemExit("hf-longlora train failed")
    trained = time.perf_counter() - started
    print(f"trained in {trained / 60:.1f} min ({trained / args.steps:.0f} s per step, model load included)")

    settings = EvalSettings(
        lengths=[native, args.target],
        mode="non_overlapping",
        max_windows=args.windows,
        passkey_lengths=[args.target],
        passkey_depths=[0.5] if args.quick else [0.0, 0.5, 1.0],
        passkey_trials=args.passkey_trials,
        forgetting=False,
        dtype=torch.bfloat16 if bf16 else None,
        extra={"data": f"the standard library's {args.heldout_files} last long files (held out)"},
    )
    specs = [
        ModelSpec(base, label="PI alone", context_length=args.target),
        ModelSpec(str(out / "adapter"), label="LongLoRA"),
    ]
    results = evaluate_models(specs, heldout, settings, out_dir=out / "eval")
    results["training"] = {
        "steps": args.steps,
        "target": args.target,
        "minutes": round(trained / 60, 1),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": config["dtype"],
    }
    results["minutes_total"] = round((time.perf_counter() - started) / 60, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(format_table(results))
    print(f"done in {results['minutes_total']} min; {out / 'results.json'}")


if __name__ == "__main__":
    main()
