"""The LongLoRA paper in miniature: its ablations on the demo's base, several seeds, results in docs/reproduction.md.

Every row fine-tunes the demo's base (``examples/demo_base``: 3.9M parameters, native context 256) to ``--factor``
times its context with the demo's RoPE extension, on the demo's training data (standard-library code, pydoc prose
and passkey prompts), for ``--steps`` steps of one block, through ``hf-longlora train`` (full fine-tuning: the same
loading, data and trainer without the adapter). Every row is evaluated with full attention on the demo's 4
held-out standard-library files: perplexity at 1x, 2x and the target, passkey at the target. Rows (the paper's
table and figure in brackets):

- Table 2, what is trained: LoRA r=8 on q/k/v/o alone; + norms; + embeddings; + both (LongLoRA); full fine-tuning;
- Table 6, attention during fine-tuning: S2-Attn (our causal partition); the paper's roll; short attention without
  shift; full attention;
- "LoRA learns less and forgets less" (Biderman et al. 2024): LongLoRA with LoRA rank 8 / 64 / 256 against full
  fine-tuning; gain at the target (perplexity of position interpolation alone minus the row's) against the loss
  at 1x (the row's perplexity minus the base's).

Outputs: ``<out>/results.json`` (every run), ``<out>/table.md`` (mean and standard deviation over seeds),
``<out>/perplexity.png`` (perplexity against length per row) and ``<out>/learning_vs_forgetting.png``.

    python benchmarks/reproduce.py                 # 3 seeds, 4x, all rows (28 minutes on 2 cores)
    python benchmarks/reproduce.py --quick         # 1 seed, 2 rows, a few steps (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from demo import DEMO_LR, DEMO_ROPE, rope_options  # noqa: E402

# name: (what it is, hf-longlora train keys that differ from LongLoRA's recipe)
ROWS: dict[str, tuple[str, dict]] = {
    "lora": ("LoRA r=8 on q/k/v/o", {"trainable_embeddings": False, "trainable_norms": False}),
    "lora_norm": ("+ norms", {"trainable_embeddings": False}),
    "lora_embed": ("+ embeddings", {"trainable_norms": False}),
    "longlora": ("+ embeddings + norms (LongLoRA), S2-Attn", {}),
    "full_ft": ("full fine-tuning, S2-Attn", {"full_fine_tuning": True}),
    "roll": ("LongLoRA, S2-Attn with the paper's roll", {"s2_shift": "roll"}),
    "no_shift": ("LongLoRA, short attention without shift", {"s2_shift": "none"}),
    "full_attention": ("LongLoRA, full attention", {"attn_implementation": "sdpa"}),
    "rank64": ("LongLoRA, LoRA r=64", {"lora_r": 64, "lora_alpha": 128}),
    "rank256": ("LongLoRA, LoRA r=256", {"lora_r": 256, "lora_alpha": 512}),
}
TABLES = {
    "Table 2: what is trained (S2-Attn)": ["lora", "lora_norm", "lora_embed", "longlora", "full_ft"],
    "Attention during fine-tuning (LongLoRA; evaluated with full attention)": [
        "longlora",
        "roll",
        "no_shift",
        "full_attention",
    ],
    "LoRA rank against full fine-tuning": ["longlora", "rank64", "rank256", "full_ft"],
}
QUICK_ROWS = ["longlora", "full_ft"]


def training_config(row: str, base: Path, corpus: list[Path], out: Path, args: argparse.Namespace, seed: int):
    """The hf-longlora train keys of one run (the demo's, with the row's changes)."""
    from demo import write_train_config

    demo_args = Namespace(
        activation_checkpointing=False,
        steps=args.steps,
        lr=args.lr,
        model=None,
        seed=seed,
        rope_method=args.rope_method,
        rope_options=None,  # the demo's YaRN ramp for the demo's base
    )
    path = out / "train.yaml"
    write_train_config(path, str(base), corpus, out / "adapter", args.target, demo_args)
    config = yaml.safe_load(path.read_text())
    config.update(ROWS[row][1])
    if config.get("full_fine_tuning"):
        config["learning_rate"] = args.full_lr
    config["no_progress"] = True
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train(config_path: Path) -> tuple[object, float]:
    """Run one training; returns (the trainer, seconds per optimizer step as the trainer measured them)."""
    from hf_longlora.cli import _explicit_keys, training_parser
    from hf_longlora.training import run_pretraining

    argv = ["--config", str(config_path)]
    config = yaml.safe_load(config_path.read_text())
    full = config.pop("full_fine_tuning", False)
    if full:
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    explicit = _explicit_keys(argv)
    model_args, corpus_args, longlora_args, training_args = training_parser(
        "train", explicit
    ).parse_args_and_config(argv)
    if full:
        trainer = train_full(model_args, corpus_args, longlora_args, training_args)
    else:
        trainer = run_pretraining(
            model_args, corpus_args, longlora_args, training_args, recipe_explicit=explicit
        )
    # the trainer's own total (the last entry; the throughput callback logs a running train_runtime before it)
    runtime = [e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e][-1]
    return trainer, runtime / trainer.state.global_step


def train_full(model_args, corpus_args, longlora_args, training_args):
    """Full fine-tuning with hf-longlora train's loading, data and trainer, without the adapter (every weight trains)."""
    import hf_longlora
    from hf_longlora.data import pack_documents, read_text_corpus, tokenize_documents
    from hf_longlora.training.checks import load_tokenizer
    from hf_longlora.training.pretraining import packed_blocks_trainer

    tokenizer = load_tokenizer(model_args.model_name_or_path)
    ids = tokenize_documents(tokenizer, read_text_corpus(corpus_args.corpus))
    blocks = pack_documents(ids, longlora_args.context_length, tokenizer.eos_token_id)
    from transformers import set_seed

    set_seed(training_args.seed)
    model = hf_longlora.load_model(
        model_args.model_name_or_path,
        context_length=longlora_args.context_length,
        rope_method=longlora_args.rope_method,
        rope_options=longlora_args.rope_options,
        attn_implementation=model_args.attn_implementation or hf_longlora.S2_ATTENTION,
        s2_group_size_ratio=longlora_args.s2_group_size_ratio,
    )
    model.config.use_cache = False
    trainer = packed_blocks_trainer(model, training_args, blocks, tokenizer)
    trainer.train()
    model.save_pretrained(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)
    return trainer


def evaluate(specs: list, heldout: list[str], args: argparse.Namespace, seed: int) -> dict:
    """Every row's protocol: perplexity at 1x/2x/4x and passkey at 4x, full attention (``{label: results}``)."""
    from hf_longlora.evaluation import EvalSettings, evaluate_models

    native = args.target // args.factor
    settings = EvalSettings(
        lengths=sorted({native, 2 * native, args.target}),
        max_windows=args.max_windows,
        batch_size=4,
        passkey_lengths=[args.target],
        passkey_trials=args.passkey_trials,
        forgetting=False,
        seed=seed,
        progress=False,
    )
    return evaluate_models(specs, heldout, settings)["models"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], reference: dict, args: argparse.Namespace) -> str:
    """The markdown tables: mean ± standard deviation over the seeds."""
    native = args.target // args.factor
    lengths = [str(n) for n in sorted({native, 2 * native, args.target})]
    target = str(args.target)
    lines = [
        f"Base: {reference['base_perplexity']} (perplexity per length, unextended); position interpolation x"
        f"{args.factor} ({args.rope_method}) alone: {reference['pi_perplexity']}; passkey@{target}: base "
        f"{reference['base_passkey']:.0%}, {args.rope_method} alone {reference['pi_passkey']:.0%}.",
        "",
    ]
    for title, rows in TABLES.items():
        rows = [r for r in rows if any(run["row"] == r for run in runs)]
        if not rows:
            continue
        lines += [f"### {title}", ""]
        header = ["row", *(f"ppl@{n}" for n in lengths), f"passkey@{target}", "s/step (median)", "seeds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            mine = [run for run in runs if run["row"] == row]
            cells = [ROWS[row][0]]
            for n in lengths:
                m, s = mean_std([run["perplexity"][n] for run in mine])
                cells.append(f"{m:.2f} ± {s:.2f}")
            m, s = mean_std([run["passkey"] for run in mine])
            cells.append(f"{m:.0%} ± {s:.0%}")
            cells.append(
                f"{statistics.median(run['seconds_per_step'] for run in mine):.3f}"
            )  # robust to one busy run
            cells.append(str(len(mine)))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(runs: list[dict], reference: dict, out: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    native = args.target // args.factor
    lengths = sorted({native, 2 * native, args.target})
    rows = list(dict.fromkeys(run["row"] for run in runs))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>pXh"
    for i, row in enumerate(rows):
        means = [statistics.fmean(r["perplexity"][str(n)] for r in runs if r["row"] == row) for n in lengths]
        ax.plot(
            lengths, means, marker=markers[i % len(markers)], label=row, linestyle=["-", "--", ":"][i % 3]
        )
    ax.plot(
        lengths,
        [reference["pi_perplexity"][str(n)] for n in lengths],
        "k--",
        marker="x",
        label=f"{args.rope_method} alone",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (full attention)")
    ax.set_title(f"Perplexity after {args.steps} steps at {args.target} tokens (mean of seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in [r for r in TABLES["LoRA rank against full fine-tuning"] if r in rows]:
        mine = [r for r in runs if r["row"] == row]
        gain = [
            reference["pi_perplexity"][str(args.target)] - r["perplexity"][str(args.target)] for r in mine
        ]
        loss = [r["perplexity"][str(native)] - reference["base_perplexity"][str(native)] for r in mine]
        ax.scatter(loss, gain, label=row)
        ax.annotate(row, (statistics.fmean(loss), statistics.fmean(gain)), fontsize=8)
    ax.set_xlabel(f"forgetting: perplexity at {native} minus the base's (lower is better)")
    ax.set_ylabel(f"learning: ppl at {args.target}, {args.rope_method} alone minus the row's")
    ax.set_title("Learning vs forgetting (one point per seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_vs_forgetting.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/reproduce")
    parser.add_argument("--base", default=None, help="the base (default: the demo's committed one)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=DEMO_LR, help="learning rate of the LoRA rows")
    parser.add_argument("--rope-method", default=DEMO_ROPE, help="RoPE extension (the demo's by default)")
    parser.add_argument(
        "--full-lr",
        type=float,
        default=2e-4,
        help="learning rate of full fine-tuning (LoRA is usually trained at ~10x full fine-tuning's; 2e-4 is "
        "also where the base's pretraining schedule ended)",
    )
    parser.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="perplexity windows per length (default: all, every 256)",
    )
    parser.add_argument("--passkey-trials", type=int, default=2)
    parser.add_argument("--passkey-share", type=float, default=0.3)
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 2 rows, 3 steps, 2 windows (smoke test)"
    )
    parser.add_argument(
        "--summarize", action="store_true", help="only rewrite table.md and the plots from <out>/results.json"
    )
    args = parser.parse_args()
    if args.summarize:
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        saved = Namespace(**results["settings"])
        (out / "table.md").write_text(summarize(results["runs"], results["reference"], saved) + "\n")
        plots(results["runs"], results["reference"], out, saved)
        print((out / "table.md").read_text())
        return
    from demo_base import CHECKPOINT

    if args.quick:
        args.seeds, args.steps, args.max_windows, args.passkey_trials = [0], 3, 2, 1
        args.rows = args.rows or QUICK_ROWS
    rows = args.rows or list(ROWS)
    base = Path(args.base) if args.base else CHECKPOINT
    from transformers import AutoConfig, AutoTokenizer

    from hf_longlora.adapters.context import original_context_length

    native = original_context_length(AutoConfig.from_pretrained(base))
    args.target = native * args.factor
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from demo import split_data

    data_args = Namespace(
        data="mixed",
        passkey_share=args.passkey_share,
        passkey_lengths=None,
        factor=args.factor,
        seed=0,
        heldout_files=4,
        max_train_files=24,
    )
    corpus, heldout = split_data(data_args, out / "data", AutoTokenizer.from_pretrained(base), args.target)

    started = time.perf_counter()
    from hf_longlora.evaluation import ModelSpec

    demo_rope = Namespace(rope_options=None, rope_method=args.rope_method, model=None)
    pi_spec = ModelSpec(
        str(base),
        label="pi",
        context_length=args.target,
        rope_method=args.rope_method,
        rope_options=rope_options(demo_rope),
    )
    references = evaluate([ModelSpec(str(base), label="base"), pi_spec], heldout, args, seed=0)
    ref, pi = references["base"], references["pi"]
    reference = {
        "base_perplexity": {str(n): round(v, 3) for n, v in ref["perplexity"].items()},
        "pi_perplexity": {str(n): round(v, 3) for n, v in pi["perplexity"].items()},
        "base_passkey": ref["passkey_accuracy"][args.target],
        "pi_passkey": pi["passkey_accuracy"][args.target],
    }
    runs = []
    for seed in args.seeds:
        for row in rows:
            run_dir = out / "runs" / f"{row}_seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            config = training_config(row, base, corpus, run_dir, args, seed)
            _, per_step = train(config)
            spec = ModelSpec(str(run_dir / "adapter"), label=row, base=str(base))
            result = evaluate([spec], heldout, args, seed=0)[row]
            runs.append(
                {
                    "row": row,
                    "seed": seed,
                    "perplexity": {str(n): round(v, 4) for n, v in result["perplexity"].items()},
                    "passkey": result["passkey_accuracy"][args.target],
                    "seconds_per_step": round(per_step, 4),
                }
            )
            shutil.rmtree(run_dir / "adapter")  # keep the numbers, not the weights
            elapsed = (time.perf_counter() - started) / 60
            print(
                f"{row} seed {seed}: ppl {runs[-1]['perplexity']} passkey {runs[-1]['passkey']:.0%} "
                f"{per_step:.3f} s/step ({elapsed:.1f} min so far)",
                flush=True,
            )
    results = {
        "settings": vars(args),
        "reference": reference,
        "runs": runs,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = summarize(runs, reference, args)
    (out / "table.md").write_text(table + "\n")
    plots(runs, reference, out, args)
    print(table)
    print(f"{len(runs)} runs in {results['minutes']} min; {out}/results.json, table.md, *.png")
    assert all(math.isfinite(v) for run in runs for v in run["perplexity"].values())


if __name__ == "__main__":
    main()
