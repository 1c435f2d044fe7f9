"""The ``hf-longlora`` command line.

hf-longlora merge --base BASE --adapter DIR --out DIR [--overwrite] [--from-4bit] [--dtype bf16]
hf-longlora push --adapter DIR --repo-id ORG/NAME [--private] [--merged] [--base-model ID]
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge_and_save

    out = merge_and_save(
        args.base,
        args.adapter,
        args.out,
        overwrite=args.overwrite,
        from_4bit=args.from_4bit,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    print(f"merged model saved to {out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    url = push_to_hub(
        args.adapter, args.repo_id, private=args.private, merged=args.merged, base_model=args.base_model
    )
    print(f"pushed {args.adapter} to {args.repo_id}: {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-longlora", description="LongLoRA for the Hugging Face stack.")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="fold an adapter into a standalone transformers checkpoint")
    merge.add_argument("--base", required=True, help="base model path or Hub id the adapter was trained on")
    merge.add_argument("--adapter", required=True, help="LongLoRA adapter directory")
    merge.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    merge.add_argument(
        "--from-4bit", action="store_true", help="the adapter was trained on an NF4 (QLoRA) base"
    )
    merge.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the saved weights")
    merge.set_defaults(run=_merge)

    push = sub.add_parser("push", help="upload an adapter (or a merged model) with a model card")
    push.add_argument(
        "--adapter", required=True, help="adapter directory, or merged model directory with --merged"
    )
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--merged", action="store_true", help="the directory is a merged model")
    push.add_argument(
        "--base-model", default=None, help="base model id for the card (default: from the adapter)"
    )
    push.set_defaults(run=_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"hf-longlora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
