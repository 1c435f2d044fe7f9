"""The LM-head loss: fused chunks vs checkpointed chunks vs the model's own loss (full fp32 logits)."""

from __future__ import annotations

from .cells import Runner, fmt_gib
from .speed import longlora_cell


def mode_loss(runner: Runner, args):
    for _ in range(args.repeats):
        for length in args.loss_lengths:
            for loss in ("chunked", "checkpointed", "plain"):
                runner.run(method="longlora", length=length, loss=loss)
    print(
        "\n## LongLoRA step: fused chunked loss vs checkpointed chunks (head recomputed) vs the model's own loss "
        "(full fp32 logits)"
    )
    print(
        f"{'L':>6} | {'fused cpu s':>11} {'ckpt cpu s':>10} {'plain cpu s':>11} {'ckpt/fused':>10} | "
        f"{'fused GiB':>9} {'ckpt GiB':>8} {'plain GiB':>9}"
    )
    for length in args.loss_lengths:
        cells = [longlora_cell(runner, args, length, loss=x) for x in ("chunked", "checkpointed", "plain")]
        if not all(cells):
            continue
        fu, ck, pl = cells
        print(
            f"{length:>6} | {fu['cpu']:>11.1f} {ck['cpu']:>10.1f} {pl['cpu']:>11.1f} {ck['cpu'] / fu['cpu']:>9.2f}x | "
            f"{fmt_gib(fu['peak']):>9} {fmt_gib(ck['peak']):>8} {fmt_gib(pl['peak']):>9}"
        )
