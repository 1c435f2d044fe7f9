"""`make demo`: the whole LongLoRA job on a small Llama, offline, on CPU, in a few minutes.

1. Base model: a 3.9M-parameter Llama pretrained from scratch at a native context of 256 tokens on what ships with
   every Python: the standard library's source files (the last 8 long ones held out), pydoc's prose and passkey
   prompts, so it retrieves at 256 tokens; it does not at 1,024. It ships as a checkpoint (``examples/demo_base/``)
   made by ``examples/demo_base.py``; ``--rebuild-base`` makes it again (fixed seeds; 32 minutes on our 2-core
   AVX-512 machine).
2. LongLoRA: ``hf-longlora train`` (the CLI, in process) extends the context ``--factor`` times (4x) with YaRN
   (its ramp fitted to a 256-token model, ``DEMO_ROPE_OPTIONS``) and trains LoRA on q/k/v/o plus the embeddings and
   norms with S2-Attn on blocks of the target length, on code, prose and passkey prompts of up to the target
   length.
3. The same run with full attention instead of S2-Attn (``attn_implementation: sdpa``), for comparison.
4. Evaluation (``hf_longlora.evaluation``, full attention): perplexity at 1x, 2x and 4x the native context on 4
   held-out standard-library files, and passkey retrieval at 1x and 4x, for the base, the base with the RoPE
   extension alone ("before"; "pi_alone": linear position interpolation), the two LongLoRA adapters and the merged
   model; forgetting at 1x.
5. Saves the adapter (``<out>/adapter``, with a model card), the merged model (``<out>/merged``), the plots and
   ``<out>/summary.json``, and prints the table and whether each goal of the demo was met.

    python examples/demo.py [--out outputs/demo] [--steps 150] [--factor 4] [--rebuild-base]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from hf_longlora import build_model_card, merge_and_save
from hf_longlora.cli import main as hf_longlora_cli
from hf_longlora.data import passkey_documents
from hf_longlora.evaluation import EvalSettings, ModelSpec, evaluate_models, format_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_base import (  # noqa: E402
    CHECKPOINT,
    CODE_HELD_OUT,
    DEFAULTS,
    SETTINGS_FILE,
    build_base,
    pydoc_split,
    stdlib_split,
)

DEMO_ROPE = (
    "yarn"  # see "rope_method" in README's demo section: linear PI breaks the small base's digit copying
)
# YaRN's ramp in rotations over the original context. transformers' 32 / 1 keep the dimensions of wavelength below
# 4096 / 32 = 128 tokens of a 4k-token Llama; for this 256-token base the same 128 tokens is beta_fast = 2
# (with 32, all but the fastest two dimensions are interpolated and the base's retrieval breaks even at 256).
DEMO_ROPE_OPTIONS = {"beta_fast": 2.0, "beta_slow": 1.0}
DEMO_LR = 5e-4


def base_model(out: Path, args: argparse.Namespace) -> Path:
    """The committed checkpoint, or (``--rebuild-base``) one pretrained into ``out`` (reused when its settings match)."""
    overrides = {k: v for k, v in {"steps": args.base_steps, "native": args.native}.items() if v is not None}
    if not args.rebuild_base:
        if overrides:
            raise SystemExit("--base-steps and --native change the base: add --rebuild-base")
        if args.base != str(CHECKPOINT):
            print(f"1) base model: {args.base}")
            return Path(args.base)
        print(f"1) base model: {CHECKPOINT} (committed; examples/demo_base.py made it)")
        return CHECKPOINT
    settings = {**DEFAULTS, **overrides}
    marker = out / SETTINGS_FILE
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if {k: saved.get(k) for k in settings} == settings:
            print(f"1) base model: reusing {out} (pretrained earlier with the same settings)")
            return out
    print(f"1) base model: pretraining into {out}")
    return build_base(out, settings)


def split_data(
    args: argparse.Namespace, data_dir: Path, tokenizer, target: int
) -> tuple[list[Path], list[str]]:
    """Training files and held-out documents.

    mixed (default): the base's training prose (pydoc, in documents of 8,000 characters) and the standard library's
    training files (at most ``--max-train-files``), mixed with passkey prompts of the native to the target length
    (``--passkey-share`` of all tokens, their keys from other seeds than the evaluation's), shuffled; held out: the
    last ``--heldout-files`` long files of the standard library, which the base never saw. pydoc: the prose and
    passkey prompts only, held out: the last 5% of the prose. stdlib: the standard library's files only.
    """
    import random

    data_dir.mkdir(parents=True, exist_ok=True)
    if args.heldout_files > CODE_HELD_OUT:
        raise SystemExit(f"--heldout-files must be <= {CODE_HELD_OUT} (the files the base never saw)")
    train_code, heldout_code = stdlib_split()
    heldout_code = heldout_code[-args.heldout_files :]
    if args.data == "stdlib":
        for i, doc in enumerate(train_code[: args.max_train_files]):
            (data_dir / f"train_{i:03d}.txt").write_text(doc, encoding="utf-8")
        return sorted(data_dir.glob("train_*.txt")), heldout_code
    train_text, heldout_prose = pydoc_split()
    documents = [train_text[i : i + 8000] for i in range(0, len(train_text), 8000)]
    if args.data == "mixed":
        documents += train_code[: args.max_train_files]
    if args.passkey_share > 0:
        tokens = sum(len(ids) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"])
        low, high = args.passkey_lengths or (target // args.factor, target)
        count = round(args.passkey_share / (1 - args.passkey_share) * tokens / ((low + high) / 2))
        prose = [train_text[i : i + 8000] for i in range(0, len(train_text), 8000)]
        documents += passkey_documents(tokenizer, count, low, high, haystacks=prose, seed=args.seed + 7)
    random.Random(args.seed).shuffle(documents)
    path = data_dir / "train.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    return [path], [heldout_prose] if args.data == "pydoc" else heldout_code


def rope_options(args: argparse.Namespace) -> dict | None:
    """``--rope-options``, or the demo's YaRN ramp when the demo's own base is extended with YaRN."""
    if args.rope_options is not None:
        return json.loads(args.rope_options) or None
    if args.rope_method == "yarn" and args.model is None:
        return DEMO_ROPE_OPTIONS
    return None


def write_train_config(
    path: Path,
    base: str,
    corpus: list[Path],
    adapter: Path,
    target: int,
    args: argparse.Namespace,
    attention: str = "s2_attention",
) -> Path:
    """The ``hf-longlora train`` config: LongLoRA's recipe, scaled down to a small model on 2 CPU cores."""
    checkpointing = args.activation_checkpointing
    if checkpointing is None:  # short blocks on a tiny model: recomputation costs more than it saves
        checkpointing = target >= 4096
    bf16 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    config = {
        "model_name_or_path": base,
        "attn_implementation": attention,
        "corpus": [str(p) for p in corpus],
        "context_length": target,
        "rope_method": args.rope_method,
        **({"rope_options": rope_options(args)} if rope_options(args) else {}),
        "s2_group_size_ratio": 0.25,
        "output_dir": str(adapter),
        "max_steps": args.steps,
        # a few hundred steps of batch 1, not 1000 x 64 sequences as in the paper: a larger step than 7B's 2e-5
        "learning_rate": args.lr or (2e-4 if args.model else DEMO_LR),
        "warmup_steps": args.steps // 10,
        "gradient_accumulation_steps": 1,
        "activation_checkpointing": checkpointing,
        "logging_steps": max(1, args.steps // 6),
        "save_strategy": "no",
        "use_cpu": True,
        "seed": args.seed,
        "data_seed": args.seed,
        "disable_tqdm": True,
        # bf16 mixed precision where the CPU has native bf16 (2.4x faster); fp32 elsewhere (bf16 is 60x slower)
        "dtype": "float32",
        "bf16": bf16,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def goals(summary: dict) -> list[tuple[str, bool]]:
    """The demo's claims, checked on its own numbers (issue #14)."""
    native, target = str(summary["native_context"]), str(summary["target_context"])
    ppl, passkey = summary["perplexity"], summary["passkey"]
    checks = [
        (
            f"after LongLoRA: ppl@{target} < its own ppl@{native} (the longer context is used)",
            ppl["after"][target] < ppl["after"][native],
        ),
        (
            f"after LongLoRA: ppl@{target} <= 0.9x the unextended base's",
            ppl["after"][target] <= 0.9 * ppl["base"][target],
        ),
        ("forgetting at the native context <= 5%", summary["forgetting"]["change"] <= 0.05),
    ]
    if "after_full_attention" in ppl:
        s2, full = ppl["after"][target], ppl["after_full_attention"][target]
        checks.append((f"S2-Attn's ppl@{target} within 3% of full attention's", abs(s2 / full - 1) <= 0.03))
    if passkey:
        checks = [
            (f"base: passkey@{native} >= 90%", passkey["base"][native] >= 0.9),
            (f"base: passkey@{target} <= 20%", passkey["base"][target] <= 0.2),
            (f"after LongLoRA: passkey@{target} >= 90%", passkey["after"][target] >= 0.9),
            *checks,
        ]
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/demo", help="output directory")
    parser.add_argument(
        "--model",
        default=None,
        help="skip the demo's base and extend this pretrained model instead: a path, or 'smollm2' (offline "
        "SmolLM2-135M)",
    )
    parser.add_argument(
        "--rebuild-base",
        action="store_true",
        help="pretrain the base again (examples/demo_base.py, into <out>/base) instead of the committed one",
    )
    parser.add_argument(
        "--base",
        default=str(CHECKPOINT),
        help="a base made by examples/demo_base.py (default: the committed one)",
    )
    parser.add_argument("--base-steps", type=int, default=None, help="--rebuild-base: pretraining steps")
    parser.add_argument("--native", type=int, default=None, help="--rebuild-base: the base's native context")
    parser.add_argument(
        "--data",
        choices=["mixed", "pydoc", "stdlib"],
        default="mixed",
        help="mixed: the base's prose, the standard library's files and passkey prompts, the last "
        "--heldout-files files held out; pydoc: the prose (5%% held out) and passkey prompts; stdlib: the "
        "standard library's files only",
    )
    parser.add_argument(
        "--passkey-share",
        type=float,
        default=0.3,
        help="--data mixed/pydoc: share of the training tokens that are passkey prompts (0: none)",
    )
    parser.add_argument(
        "--passkey-lengths",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="--data mixed/pydoc: token lengths of the training passkey prompts (default: native to target)",
    )
    parser.add_argument(
        "--heldout-files",
        type=int,
        default=4,
        help=f"files of the standard library held out for evaluation (at most {CODE_HELD_OUT}, the base's)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"LongLoRA learning rate (default {DEMO_LR:g}, 2e-4 with --model)",
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
        default=24,
        help="--data mixed/stdlib: use at most this many of the standard library's training files",
    )
    parser.add_argument("--passkey-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument(
        "--no-passkey", action="store_true", help="skip passkey retrieval (slow at long context)"
    )
    parser.add_argument("--skip-merged-eval", action="store_true", help="do not evaluate the merged model")
    parser.add_argument(
        "--no-full-attention-run",
        action="store_true",
        help="skip the comparison run that fine-tunes with full attention instead of S2-Attn",
    )
    parser.add_argument("--factor", type=int, default=4, help="context extension factor")
    parser.add_argument(
        "--rope-method",
        default=DEMO_ROPE,
        help=f"how RoPE is extended (default {DEMO_ROPE}): linear (position interpolation, the paper's), yarn, "
        "dynamic, ...",
    )
    parser.add_argument(
        "--rope-options",
        default=None,
        help=f"RoPE parameters of --rope-method as JSON (default with yarn on the demo's base: "
        f"{json.dumps(DEMO_ROPE_OPTIONS)}; '{{}}': transformers' defaults)",
    )
    parser.add_argument("--steps", type=int, default=150, help="LongLoRA steps at the extended context")
    parser.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="perplexity windows per length (default: all, one every 256 tokens, LongLoRA's protocol)",
    )
    parser.add_argument("--passkey-trials", type=int, default=4, help="passkey keys per depth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.passkey_share < 1:
        parser.error(f"--passkey-share must be in [0, 1), got {args.passkey_share}")
    try:
        from hf_longlora.adapters.context import check_rope_options

        check_rope_options(args.rope_method, rope_options(args), "--rope-options")
    except (ValueError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    out = Path(args.out)
    from transformers import AutoConfig, AutoTokenizer

    from hf_longlora.adapters.context import original_context_length
    from hf_longlora.adapters.smollm2 import resolve_model_path

    if args.model is None:
        base = str(base_model(out / "base", args))
    else:
        base = resolve_model_path(args.model)
        print(f"1) base model: {args.model} ({base})")
    native = original_context_length(AutoConfig.from_pretrained(base))
    print(f"   native context {native} tokens")
    target = args.target or native * args.factor
    lengths = sorted({native, min(2 * native, target), target})
    corpus, heldout = split_data(args, out / "data", AutoTokenizer.from_pretrained(base), target)

    seconds = {"base and data": round(time.perf_counter() - start, 1)}
    runs = {"after": ("s2_attention", out / "adapter")}
    if not args.no_full_attention_run:
        runs["after_full_attention"] = ("sdpa", out / "adapter_full_attention")
    for step, (label, (attention, adapter)) in enumerate(runs.items(), 2):
        if adapter.exists():
            shutil.rmtree(adapter)
        config = write_train_config(
            out / f"train_{label}.yaml", base, corpus, adapter, target, args, attention=attention
        )
        how = "S2-Attn" if attention == "s2_attention" else "full attention, for comparison"
        print(
            f"{step}) LongLoRA: hf-longlora train --config {config}  ({args.steps} steps at {target} tokens, {how})"
        )
        if hf_longlora_cli(["train", "--config", str(config)]) != 0:
            raise SystemExit("hf-longlora train failed")
        seconds[label] = round(time.perf_counter() - start - sum(seconds.values()), 1)
    adapter = runs["after"][1]
    merged = out / "merged"
    merge_and_save(base, str(adapter), str(merged), overwrite=True)
    passkey_lengths = [] if args.no_passkey else sorted({native, target})

    print(
        f"{len(runs) + 2}) evaluation with full attention: perplexity at {lengths}, "
        f"{f'passkey at {passkey_lengths}' if passkey_lengths else 'no passkey'}, forgetting at {native}"
    )
    settings = EvalSettings(
        lengths=lengths,
        max_windows=args.max_windows,
        batch_size=4,
        passkey_lengths=passkey_lengths,
        passkey_trials=args.passkey_trials,
        passkey_depths=args.passkey_depths,
        forgetting_length=native,
        seed=args.seed,
        progress=False,
        extra={
            "data": "pydoc_data/topics.py, last 5% (held out)"
            if args.data == "pydoc"
            else f"the standard library's {args.heldout_files} last long files (held out from the base too)"
        },
    )
    specs = [
        ModelSpec(base, label="base"),
        # the RoPE extension alone: the demo's YaRN, and the paper's position interpolation
        ModelSpec(
            base,
            label="before",
            context_length=target,
            rope_method=args.rope_method,
            rope_options=rope_options(args),
        ),
        *(
            [ModelSpec(base, label="pi_alone", context_length=target, rope_method="linear")]
            if args.rope_method != "linear"
            else []
        ),
        *(ModelSpec(str(path), label=label) for label, (_, path) in runs.items()),
    ]
    if not args.skip_merged_eval:
        specs.append(ModelSpec(str(merged), label="merged"))
    seconds["merge"] = round(time.perf_counter() - start - sum(seconds.values()), 1)
    results = evaluate_models(specs, heldout, settings, out_dir=out / "eval")
    seconds["eval"] = round(time.perf_counter() - start - sum(seconds.values()), 1)
    models = results["models"]

    summary = {
        "native_context": native,
        "target_context": target,
        "perplexity": {
            label: {str(n): round(v, 3) for n, v in entry["perplexity"].items()}
            for label, entry in models.items()
        },
        "passkey": None
        if args.no_passkey
        else {
            label: {str(n): v for n, v in entry["passkey_accuracy"].items()}
            for label, entry in models.items()
        },
        "forgetting": {
            "length": native,
            "base": round(models["base"]["forgetting"]["perplexity"], 3),
            "after": round(models["after"]["forgetting"]["perplexity"], 3),
            "change": round(models["after"]["forgetting"]["change_vs_base"], 4),
        },
        "protocol": results["protocol"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "seconds": {**seconds, "total": round(time.perf_counter() - start, 1)},
    }
    checks = goals(summary)
    summary["goals"] = {claim: met for claim, met in checks}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    # the adapter's model card shows the before/after table
    card = {
        "perplexity": {k: summary["perplexity"][k] for k in ("before", "after")},
        "passkey": None
        if args.no_passkey
        else {k: summary["passkey"][k][str(target)] for k in ("before", "after")},
    }
    (adapter / "eval_summary.json").write_text(json.dumps(card, indent=2) + "\n")
    build_model_card(adapter).save(adapter / "README.md")

    print()
    print(format_table(results))
    before, after = summary["perplexity"]["before"][str(target)], summary["perplexity"]["after"][str(target)]
    print()
    print(
        f"perplexity at {target} tokens ({target / native:g}x native): {before:.2f} before ({args.rope_method} "
        f"alone) -> {after:.2f} after LongLoRA; at {native} (forgetting): {summary['forgetting']['base']:.2f} base "
        f"-> {summary['forgetting']['after']:.2f} after ({summary['forgetting']['change']:+.1%})"
    )
    for claim, met in checks:
        print(f"  [{'met' if met else 'MISSED'}] {claim}")
    print(
        f"adapter + card: {adapter}   merged: {merged}   plots: {out / 'eval'}   summary: {out / 'summary.json'}"
    )
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"done in {summary['seconds']['total']:.0f} s ({phases})")


if __name__ == "__main__":
    main()
