"""The ``hf-longlora`` command line: the only module that parses command lines; everything it runs lives below it
(adapters, training, evaluation, data), and nothing below imports it.

hf-longlora eval --model PATH [--model LABEL=PATH ...] --data FILES|stdlib --lengths N [N ...] [--out DIR]
    [--tasks niah_single vt ...|all --task-lengths N [N ...] --task-trials K]
hf-longlora merge --base BASE --adapter DIR --out DIR [--overwrite] [--from-4bit] [--dtype bf16]
hf-longlora push --adapter DIR --repo-id ORG/NAME [--private] [--merged] [--base-model ID]
hf-longlora data longalpaca-sample --out FILE.jsonl [--records N] [--length L] [--tokenizer PATH] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys

# the dtype names every subcommand accepts (hf_longlora.adapters.loading.DTYPE_NAMES; kept here so --help imports
# no torch)
DTYPE_CHOICES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32", "half")


# hf_longlora.evaluation's defaults, repeated so that --help imports no torch (tests/test_cli_startup.py keeps
# them equal)
PERPLEXITY_MODES = ("sliding", "non_overlapping")
DEFAULT_STRIDE = 256
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _dtype(name: str | None, flag: str = "--dtype"):
    from .adapters.loading import parse_dtype

    return parse_dtype(name, argument=flag)


def _merge(args: argparse.Namespace) -> int:
    from .adapters.merge import merge_and_save

    out = merge_and_save(
        args.base,
        args.adapter,
        args.out,
        overwrite=args.overwrite,
        from_4bit=args.from_4bit,
        dtype=_dtype(args.dtype),
        context_length=args.context_length,
        rope_method=args.rope_method,
    )
    print(f"merged model saved to {out}")
    return 0


def _hub_error(exc: Exception) -> str | None:
    """A one-line explanation of what huggingface_hub raised while pushing, or None if it is not a Hub error."""
    from huggingface_hub import errors

    if isinstance(exc, errors.OfflineModeIsEnabled):
        return "the Hub is switched off here (HF_HUB_OFFLINE=1): unset it to push; nothing was uploaded"
    if isinstance(exc, errors.LocalTokenNotFoundError):
        return "no Hub token: run `hf auth login`, set HF_TOKEN, or pass --token; nothing was uploaded"
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return (
                f"the Hub refused the token ({status}): check it with `hf auth whoami`, or pass --token with "
                "write access to the repository; nothing was uploaded"
            )
        return f"the Hub answered an error ({status}): {str(exc).splitlines()[0]}; nothing was uploaded"
    if isinstance(exc, (errors.HTTPError, ConnectionError, TimeoutError)):
        return f"cannot reach the Hub ({type(exc).__name__}: {exc}): check the network; nothing was uploaded"
    return None


def _push(args: argparse.Namespace) -> int:
    from .adapters.hub import push_to_hub

    try:
        url = push_to_hub(
            args.adapter,
            args.repo_id,
            token=args.token,
            private=True if args.private else None,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            merged=args.merged,
            base_model=args.base_model,
        )
    except Exception as exc:
        message = _hub_error(exc)
        if message is None:
            raise
        raise ConnectionError(message) from exc
    print(f"pushed {args.adapter} to {args.repo_id}: {url}")
    return 0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


class _ModelAction(argparse.Action):
    """``--model`` appends a model; the ``--context-length`` and ``--rope-method`` after it apply to it alone."""

    def __call__(self, parser, namespace, values, option_string=None):
        models = list(getattr(namespace, self.dest, None) or [])
        models.append({"spec": values, "context_length": None, "rope_method": None, "rope_options": None})
        setattr(namespace, self.dest, models)


class _PerModelAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        models = getattr(namespace, "model", None)
        if not models:
            parser.error(f"{option_string} applies to the --model before it: put it after a --model")
        models[-1][self.dest] = values


def _model_spec(entry: dict, base: str | None):
    from .evaluation import ModelSpec
    from .evaluation.models import is_adapter_dir

    label, sep, path = entry["spec"].partition("=")
    if not sep:
        label, path = None, entry["spec"]
    if (entry["context_length"] is not None or entry["rope_options"]) and is_adapter_dir(path):
        raise ValueError(
            f"--context-length / --rope-options after --model {entry['spec']}: an adapter restores the context it "
            "was trained at; give them to a plain model (position interpolation alone)"
        )
    if entry["rope_options"] and entry["context_length"] is None:
        raise ValueError(f"--rope-options after --model {entry['spec']} needs --context-length after it too")
    return ModelSpec(
        path,
        label=label,
        base=base,
        context_length=entry["context_length"],
        rope_method=entry["rope_method"] or "linear",
        rope_options=entry["rope_options"],
    )


def _eval(args: argparse.Namespace) -> int:
    from .data import read_text_corpus, stdlib_documents
    from .evaluation import EvalSettings, evaluate_models, format_table

    settings = EvalSettings(
        lengths=args.lengths,
        stride=args.stride,
        mode=args.mode,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        passkey_lengths=args.passkey_lengths or (),
        passkey_depths=args.passkey_depths,
        passkey_trials=args.passkey_trials,
        tasks=args.tasks or (),
        task_lengths=args.task_lengths or (),
        task_trials=args.task_trials,
        forgetting_length=args.forgetting_length,
        forgetting=not args.no_forgetting,
        seed=args.seed,
        dtype=_dtype(args.dtype),
        progress=not args.no_progress,
        extra={"data": args.data, "forgetting_data": args.forgetting_data or args.data},
    )
    settings.check()
    if args.no_progress:
        from ._quiet import hide_progress_bars

        hide_progress_bars()
    from .evaluation.run import plots_available

    if not plots_available():
        print(
            "hf-longlora eval: matplotlib is not installed: plots are skipped (pip install 'hf-longlora[eval]'); "
            f"the table and the JSON files in {args.out} are written",
            flush=True,
        )
    from pathlib import Path

    earlier = [n for n in ("eval.json", "eval_summary.json") if (Path(args.out) / n).exists()]
    if earlier and not args.overwrite:
        raise FileExistsError(
            f"--out {args.out} holds earlier results ({', '.join(earlier)}); pass --overwrite "
            "to replace them, or choose another --out"
        )

    def documents(paths):
        docs = (
            stdlib_documents() if paths == ["stdlib"] else read_text_corpus(paths, text_field=args.text_field)
        )
        return docs[: args.max_documents] if args.max_documents else docs

    specs = [_model_spec(m, args.base) for m in args.model]
    results = evaluate_models(
        specs,
        documents(args.data),
        settings,
        forgetting_documents=documents(args.forgetting_data) if args.forgetting_data else None,
        out_dir=args.out,
    )
    print(format_table(results))
    print(f"results, summary{' and plots' if plots_available() else ''} written to {args.out}")
    return 0


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="perplexity per context length, passkey retrieval, RULER tasks and forgetting, full attention "
        "(docs/evaluation.md)",
    )
    ev.add_argument(
        "--model",
        action=_ModelAction,
        required=True,
        help="model dir, Hub id, 'smollm2', merged model or adapter dir; LABEL=PATH names it; repeat to compare",
    )
    ev.add_argument(
        "--base", default=None, help="base model of the adapters (default: recorded in each adapter)"
    )
    ev.add_argument(
        "--context-length",
        type=int,
        action=_PerModelAction,
        default=None,
        help="extend the --model before it (a plain model, not an adapter) to this context first: the "
        "position-interpolation-alone baseline",
    )
    ev.add_argument(
        "--rope-method",
        choices=("linear", "yarn", "dynamic"),
        action=_PerModelAction,
        default=None,
        help="how --context-length extends the --model before it (default linear: position interpolation)",
    )
    ev.add_argument(
        "--rope-options",
        type=_json_object,
        action=_PerModelAction,
        default=None,
        help='with --context-length: the method\'s RoPE parameters as JSON, e.g. \'{"beta_fast": 4, "beta_slow": 1}\' '
        "for yarn",
    )
    ev.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="held-out documents: .txt/.md/.py/.jsonl files, dirs, or 'stdlib'",
    )
    ev.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    ev.add_argument("--max-documents", type=int, default=None, help="use at most this many documents")
    ev.add_argument(
        "--lengths", type=int, nargs="+", required=True, help="context lengths (tokens) for perplexity"
    )
    ev.add_argument("--mode", choices=PERPLEXITY_MODES, default="sliding", help="window placement")
    ev.add_argument(
        "--stride", type=int, default=DEFAULT_STRIDE, help="sliding mode: a window starts every STRIDE tokens"
    )
    ev.add_argument("--max-windows", type=int, default=None, help="score an evenly spaced subset of windows")
    ev.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    ev.add_argument("--passkey-lengths", type=int, nargs="*", default=None, help="prompt lengths for passkey")
    ev.add_argument(
        "--passkey-depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS), help="relative needle depths"
    )
    ev.add_argument("--passkey-trials", type=int, default=2, help="keys per (length, depth) cell")
    from .data.ruler import TASK_NAMES  # pure Python: --help still imports no torch

    ev.add_argument(
        "--tasks",
        nargs="+",
        choices=(*TASK_NAMES, "all"),
        default=None,
        metavar="TASK",
        help=f"RULER tasks, generated offline: {', '.join(TASK_NAMES)}, or all (docs/evaluation.md)",
    )
    ev.add_argument(
        "--task-lengths",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths of the RULER tasks (prompt + answer; default: --lengths)",
    )
    ev.add_argument("--task-trials", type=int, default=2, help="prompts per (RULER task, length) cell")
    ev.add_argument(
        "--forgetting-data",
        nargs="+",
        default=None,
        help="held-out text of the base's domain (default: --data)",
    )
    ev.add_argument(
        "--forgetting-length", type=int, default=None, help="default: the first model's original context"
    )
    ev.add_argument(
        "--no-forgetting", action="store_true", help="skip the forgetting window (one pass less per model)"
    )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=None, help="weights dtype (default: checkpoint's)"
    )
    ev.add_argument(
        "--out",
        default="outputs/eval",
        help="directory for eval.json, eval_summary.json and plots (default: outputs/eval); refused if it holds "
        "earlier results, unless --overwrite",
    )
    ev.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(run=_eval)


def training_parser(command: str, explicit: set[str] | frozenset[str] = frozenset()):
    """TrlParser for `train` (ModelConfig, corpus, LongLoRA, TrainingArguments) or `sft` (TRL's sft script's
    dataclasses plus LongLoRA's and the LongAlpaca data arguments), with LongLoRA's recipe defaults.

    ``explicit``: the keys the user set; the recipe's automatic precision (bf16 where it is native) applies only
    when none of ``bf16`` / ``fp16`` / ``dtype`` is among them."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    from .training import CorpusArguments, LongLoraArguments, SFTDataArguments, recipe_defaults_for

    if command == "train":
        from transformers import TrainingArguments

        types = (ModelConfig, CorpusArguments, LongLoraArguments, TrainingArguments)
    else:
        types = (
            ScriptArguments,
            SFTConfig,
            ModelConfig,
            DatasetMixtureConfig,
            LongLoraArguments,
            SFTDataArguments,
        )
    parser = TrlParser(types, prog=f"hf-longlora {command}")
    for action in parser._actions:
        if action.dest == "dtype" and action.choices:  # the same dtype names as eval and merge
            action.choices = sorted({*action.choices, *DTYPE_CHOICES})
    recipe_defaults_for(parser, explicit)
    return parser


def _explicit_keys(argv: list[str]) -> set[str]:
    """The keys a user set, in the --config YAML or as --flags (the recipe scales only the others)."""
    keys = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2]
        if (arg == "--config" or arg.startswith("--config=")) and path:
            keys |= set(read_config(path))
    return keys


def read_config(path: str) -> dict:
    """A --config YAML as a dict; a missing file, a syntax error (with its line) or a non-mapping is a ValueError."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as exc:
        raise ValueError(f"--config {path}: no such file") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--config {path}: YAML syntax error{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must hold key: value lines, got a {type(data).__name__}")
    return data


def _run_training(command: str, argv: list[str]) -> int:
    from .training import run_pretraining, run_sft
    from .training.callbacks import NonFiniteLossError

    try:
        explicit = _explicit_keys(argv)
        parser = training_parser(command, explicit)

        def one_line_error(message: str):  # argparse would print the whole usage (145 lines) first
            key = message.removeprefix("argument ").split(":")[0].split("/")[0].lstrip("-")
            raise ValueError(
                f"{key}: {message.split(': ', 1)[-1]} (`hf-longlora {command} --help` lists the keys)"
            )

        parser.error = one_line_error
        *parsed, config_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        unknown = [a.lstrip("-") for a in config_rest if a.startswith("--")]
        if unknown or cli_rest:
            raise ValueError(
                f"unknown keys {unknown + [a for a in cli_rest if a.startswith('--')] or cli_rest}; "
                f"`hf-longlora {command} --help` lists the accepted keys"
            )
        longlora_args = parsed[2] if command == "train" else parsed[4]
        if longlora_args.no_progress:
            from ._quiet import hide_progress_bars

            hide_progress_bars()
            (parsed[3] if command == "train" else parsed[1]).disable_tqdm = True
        if command == "train":
            model_args, corpus_args, longlora_args, training_args = parsed
            run_pretraining(model_args, corpus_args, longlora_args, training_args, recipe_explicit=explicit)
        else:
            script_args, training_args, model_args, dataset_args, longlora_args, data_args = parsed
            run_sft(script_args, training_args, model_args, dataset_args, longlora_args, data_args, explicit)
    except (ValueError, OSError, ImportError, NonFiniteLossError) as exc:
        print(f"hf-longlora {command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _trl_hook(args: argparse.Namespace) -> int:
    from .training import trl_hook

    if args.action == "install":
        path = trl_hook.install(args.site_dir)
        print(
            f"installed {path}; set {trl_hook.ENV_VAR}=1 (e.g. in the YAML's env: block) to register s2_attention"
        )
    elif args.action == "remove":
        print("removed" if trl_hook.remove(args.site_dir) else "not installed")
    else:
        print("installed" if trl_hook.is_installed(args.site_dir) else "not installed")
    return 0


# build_longalpaca_sample's arguments as `hf-longlora data` spells them (its errors name the flags)
DATA_FLAGS = {
    "num_records": "--records",
    "target_length": "--length",
    "min_length": "--min-length",
    "passkey_fraction": "--passkey-fraction",
}


def _check_out_file(path: str, overwrite: bool, flag: str = "--out") -> None:
    from pathlib import Path

    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name, e.g. {out / 'sample.jsonl'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it")


def _data(args: argparse.Namespace) -> int:
    import re
    from collections import Counter

    from .data.longalpaca_sample import build_longalpaca_sample, write_jsonl

    _check_out_file(args.out, args.overwrite)
    tokenizer = None
    if args.tokenizer:
        from .adapters.smollm2 import resolve_model_path
        from .training.checks import load_tokenizer

        try:
            tokenizer = load_tokenizer(resolve_model_path(args.tokenizer))
        except ValueError as exc:
            raise ValueError(str(exc).replace("model_name_or_path=", "--tokenizer ")) from exc
    try:
        records = build_longalpaca_sample(
            args.records,
            args.length,
            min_length=args.min_length,
            tokenizer=tokenizer,
            passkey_fraction=args.passkey_fraction,
            seed=args.seed,
        )
    except ValueError as exc:
        message = re.sub("|".join(DATA_FLAGS), lambda m: DATA_FLAGS[m.group(0)], str(exc))
        raise ValueError(message) from exc
    path = write_jsonl(records, args.out)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["source"] for r in records).items()))
    print(f"wrote {len(records)} LongAlpaca-format records ({counts}) to {path}")
    return 0


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="build offline data sets (see docs/training.md)")
    data.add_argument("dataset", choices=["longalpaca-sample"], help="what to build")
    data.add_argument("--out", required=True, help="output .jsonl file (sft's data_files reads it)")
    data.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    data.add_argument("--records", type=int, default=32, help="number of records (default 32)")
    data.add_argument(
        "--length", type=int, default=8000, help="longest record, characters or --tokenizer tokens"
    )
    data.add_argument("--min-length", type=int, default=None, help="shortest record (default: --length)")
    data.add_argument("--tokenizer", default=None, help="measure lengths in this model's tokens")
    data.add_argument("--passkey-fraction", type=float, default=0.25, help="share of passkey records")
    data.add_argument("--seed", type=int, default=0, help="the same seed gives the same records")
    data.set_defaults(run=_data)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-longlora", description="LongLoRA for the Hugging Face stack.")
    parser.add_argument("--version", action="version", version=f"hf-longlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "train", help="continued pretraining on long documents (--config YAML; see docs/training.md)"
    )
    sub.add_parser(
        "sft", help="SFT on LongAlpaca-format data through TRL (--config YAML; see docs/training.md)"
    )

    _add_eval_parser(sub)

    merge = sub.add_parser("merge", help="fold an adapter into a standalone transformers checkpoint")
    merge.add_argument("--base", required=True, help="base model path or Hub id the adapter was trained on")
    merge.add_argument("--adapter", required=True, help="LongLoRA adapter directory")
    merge.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    merge.add_argument(
        "--from-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="merge into the dequantised NF4 base (QLoRA); default: as the adapter records",
    )
    merge.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="for an adapter made with plain PEFT, which does not record it: the context it was trained at",
    )
    merge.add_argument(
        "--rope-method", choices=("linear", "yarn", "dynamic"), default="linear", help="with --context-length"
    )
    merge.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="dtype of the saved weights")
    merge.set_defaults(run=_merge)

    push = sub.add_parser("push", help="upload an adapter (or a merged model) with a model card")
    push.add_argument(
        "--adapter", required=True, help="adapter directory, or merged model directory with --merged"
    )
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing")
    push.add_argument("--commit-message", default="Upload LongLoRA model", help="the commit's message")
    push.add_argument("--merged", action="store_true", help="the directory is a merged model")
    push.add_argument(
        "--base-model", default=None, help="base model id for the card (default: from the adapter)"
    )
    push.set_defaults(run=_push)

    hook = sub.add_parser(
        "trl-hook", help="opt-in registration of s2_attention inside `trl sft` (see docs/training.md)"
    )
    hook.add_argument("action", choices=["install", "remove", "status"])
    hook.add_argument(
        "--site-dir", default=None, help="site-packages directory (default: this environment's)"
    )
    hook.set_defaults(run=_trl_hook)
    _add_data_parser(sub)
    return parser


def dashed_flags(argv: list[str]) -> list[str]:
    """``--context_length`` and ``--context-length`` are the same flag in every subcommand (argparse's subcommands
    are declared with dashes; train and sft accept both through transformers' parser)."""
    out = []
    for arg in argv:
        if arg == "--":
            return out + argv[len(out) :]
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    from ._quiet import quiet_dependencies

    quiet_dependencies()  # before bitsandbytes, DeepSpeed or PEFT are imported
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "sft"):
        return _run_training(argv[0], argv[1:])
    argv = dashed_flags(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (
        ValueError,
        OSError,
        ImportError,
    ) as exc:  # OSError: missing files, a folder in the way, the network
        print(f"hf-longlora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
