"""The longest context on this machine: one LongLoRA training step of SmolLM2-135M at 32k, 64k, 128k tokens, with
the memory breakdown, the time per token (fixed S2 group size, so it should stay flat) and the tiled MLP over the
sequence (none, ours, DeepSpeed's TiledMLP) side by side."""

from __future__ import annotations

from .cells import Runner, best, fmt_gib


def mode_longest(runner: Runner, args):
    model = "tiny" if args.quick else "smollm2"
    tile = 64 if args.quick else args.tile
    for length in args.longest_lengths:
        for tiling in args.longest_tiling:
            runner.run(
                model=model,
                method="longlora",
                length=length,
                steps=1,
                group=args.fixed_group or None,
                tiled_mlp=None if tiling == "none" else tiling,
                tile=tile,
            )
    print(
        f"\n## longest context: LongLoRA step of {'the tiny model' if args.quick else 'SmolLM2-135M'} ({args.dtype}, "
        f"activation checkpointing, fused chunked loss, s2_group_size={args.fixed_group}, MLP tile {tile} tokens)"
    )
    print(
        f"{'L':>7} {'tiled MLP':>10} | {'step s':>7} {'ms/token':>8} | {'peak GiB':>8} {'process':>7} {'weights':>7} "
        f"{'grads':>6} {'AdamW':>6} {'activ.+temp':>11} {'KiB/token':>9}"
    )
    for length in args.longest_lengths:
        for tiling in args.longest_tiling:
            cell = best(
                runner.results,
                model=model,
                method="longlora",
                length=length,
                tiled_mlp=None if tiling == "none" else tiling,
                group=args.fixed_group or None,
                track=None,
            )
            if cell is None:
                continue
            r = cell["row"]
            activ = cell["peak"] - r["rss_start"] - r["weights"] - r["grads"] - r["optimizer"]
            print(
                f"{length:>7} {tiling:>10} | {cell['time']:>7.1f} {1000 * cell['time'] / length:>8.2f} | "
                f"{fmt_gib(cell['peak']):>8} {fmt_gib(r['rss_start']):>7} {fmt_gib(r['weights']):>7} "
                f"{fmt_gib(r['grads']):>6} {fmt_gib(r['optimizer']):>6} {fmt_gib(activ):>11} "
                f"{activ / length / 1024:>9.1f}"
            )
    print(
        "(peak: the cell's own peak RSS, GiB = 2^30 bytes; activ.+temp = peak - process - weights - grads - AdamW)"
    )
