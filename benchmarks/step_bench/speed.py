"""Speed: tokens/s and peak memory of LongLoRA vs LoRA with full attention vs full fine-tuning, the cost per
token with a fixed S2 group, and activation checkpointing on vs off."""

from __future__ import annotations

from .cells import Runner, bench_model, best, fmt_gib


def mode_speed(runner: Runner, args):
    methods = ["longlora", "lora", "full"]
    group = args.fixed_group
    for _ in range(args.repeats):
        for length in args.lengths:
            for method in args.methods:
                if method != "none":
                    runner.run(method=method, length=length)
            if group and length >= 2 * group and length != int(group / args.ratio):
                runner.run(method="longlora", length=length, group=group)
    print(
        f"\n## speed: tokens/s and peak memory per training step ({args.dtype}, activation checkpointing, chunked "
        f"loss, ratio {args.ratio}; the best step of each cell's runs, interleaved)"
    )
    header = (
        f"{'L':>6} | {'LongLoRA tok/s':>14} {'LoRA-full tok/s':>15} {'full-FT tok/s':>13} | {'LongLoRA GiB':>12} "
        f"{'LoRA-full GiB':>13} {'full-FT GiB':>11} | {'speed LL/LoRA':>13} {'speed LL/FT':>11} {'mem FT/LL':>9} | "
        f"{'cpu LL/LoRA':>11} {'cpu LL/FT':>9}"
    )
    print(header)
    print("-" * len(header))

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}x" if a and b and a.get(key) and b.get(key) else "-"

    for length in sorted(args.lengths):
        cells = {
            m: best(
                runner.results,
                model=bench_model(args),
                method=m,
                length=length,
                group=None,
                ckpt=True,
                loss="chunked",
            )
            for m in methods
        }
        ll, lo, ft = cells["longlora"], cells["lora"], cells["full"]
        tps = [f"{length / c['time']:.0f}" if c else "-" for c in (ll, lo, ft)]
        gib = [fmt_gib(c["peak"]) if c else "-" for c in (ll, lo, ft)]
        print(
            f"{length:>6} | {tps[0]:>14} {tps[1]:>15} {tps[2]:>13} | {gib[0]:>12} {gib[1]:>13} {gib[2]:>11} | "
            f"{ratio(lo, ll, 'time'):>13} {ratio(ft, ll, 'time'):>11} {ratio(ft, ll, 'peak'):>9} | "
            f"{ratio(lo, ll, 'cpu'):>11} {ratio(ft, ll, 'cpu'):>9}"
        )
    print(
        "speed = wall-time ratio (best step); cpu = ratio of the step's process CPU time (robust to other load)"
    )
    if group:
        print(
            f"\n## LongLoRA with a fixed s2_group_size={group}: cost per token vs L (target: <= 1.3x from 8k to 32k)"
        )
        ref = None
        for length in sorted(args.lengths):
            if length < 2 * group:
                continue
            match = dict(method="longlora", length=length, ckpt=True, loss="chunked")
            # at L = group / ratio the default run already has this group size
            cell = (
                best(runner.results, model=bench_model(args), group=None, **match)
                if length == int(group / args.ratio)
                else None
            )
            cell = cell or best(runner.results, model=bench_model(args), group=group, **match)
            if cell is None:
                continue
            per_token = cell["time"] / length * 1e3
            cpu = cell["cpu"] / length * 1e3 if cell["cpu"] else None
            ref = ref or (length, per_token, cpu)
            cpu_text = f"; cpu {cpu:.4f} ms/token, {cpu / ref[2]:.2f}x" if cpu and ref[2] else ""
            print(f"{length:>6}: {per_token:.4f} ms/token, {per_token / ref[1]:.2f}x of L={ref[0]}{cpu_text}")


def longlora_cell(runner: Runner, args, length: int, *, ckpt: bool = True, loss: str = "chunked"):
    """The best measured LongLoRA step of the benchmark model at ``length`` (ratio group, no fixed group)."""
    return best(
        runner.results,
        model=bench_model(args),
        method="longlora",
        length=length,
        ckpt=ckpt,
        loss=loss,
        group=None,
    )


def mode_ckpt(runner: Runner, args):
    for _ in range(args.repeats):
        for length in args.ckpt_lengths:
            for ckpt in (True, False):
                runner.run(method="longlora", length=length, ckpt=ckpt)
    print("\n## activation checkpointing: LongLoRA step with and without")
    print(
        f"{'L':>6} | {'on s':>7} {'off s':>7} {'time on/off':>11} | {'on GiB':>7} {'off GiB':>7} {'mem off/on':>10}"
    )
    for length in args.ckpt_lengths:
        on = longlora_cell(runner, args, length, ckpt=True)
        off = longlora_cell(runner, args, length, ckpt=False)
        if on and off:
            print(
                f"{length:>6} | {on['time']:>7.2f} {off['time']:>7.2f} {on['time'] / off['time']:>10.2f}x | "
                f"{fmt_gib(on['peak']):>7} {fmt_gib(off['peak']):>7} {off['peak'] / on['peak']:>9.2f}x"
            )
