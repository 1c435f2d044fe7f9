"""Memory budgets: peak memory vs L per method, a linear fit, the predicted longest context per budget, and a
check step at the predicted length."""

from __future__ import annotations

from .cells import GIB, METHOD_NAMES, Runner, bench_model, best, fmt_gib


def linear_fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def mode_budget(runner: Runner, args):
    methods = ["longlora", "lora", "full"]
    # LongLoRA with the fixed group (time linear in L, so the checks stay affordable; memory does not depend on it)
    groups = {
        m: None for m in methods
    }  # the fit uses the default cells (ratio), reusable from the speed mode
    check_group = {m: (args.fixed_group or None) if m == "longlora" else None for m in methods}
    for method in methods:
        for length in args.fit_lengths:
            runner.run(method=method, length=length, steps=1, group=groups[method])
    print(
        f"\n## budget: peak memory vs L (fit: peak = a + b * L over L = {args.fit_lengths}), predicted longest context"
        f" ('measured' = a step ran at the check length; LongLoRA's check runs use s2_group_size={args.fixed_group})"
    )
    fits = {}

    def fit_match(method, length):
        match = dict(model=bench_model(args), method=method, length=length, ckpt=True, loss="chunked")
        if method != "longlora":  # LongLoRA's memory does not depend on the group size: any group counts
            match["group"] = None
        return match

    for method in methods:
        points = [(length, best(runner.results, **fit_match(method, length))) for length in args.fit_lengths]
        points = [(length, c) for length, c in points if c]
        if len(points) < 2:
            continue
        a, b = linear_fit([p[0] for p in points], [p[1]["peak"] for p in points])
        fits[method] = (a, b, points)
        worst = max(abs(c["peak"] - (a + b * length)) for length, c in points)
        print(
            f"{METHOD_NAMES[method]:<20} a = {a / GIB:.3f} GiB, b = {b / 1024:.1f} KiB/token "
            f"(max residual {worst / 2**20:.0f} MiB); measured: "
            + ", ".join(f"{length}: {fmt_gib(c['peak'])} GiB" for length, c in points)
        )
    print(
        f"\n{'method':<20} {'budget':>7} {'predicted max L':>15} {'check L':>8} {'check peak GiB':>14} {'status':>10}"
    )
    for method, (a, b, points) in fits.items():
        for budget in args.budgets:
            predicted = int((budget * GIB - a) / b) if b > 0 else 0
            check = (predicted // 2048) * 2048  # a multiple of the fixed group
            # a step at L costs about the largest fitted step's time scaled by (L / L_fit)^p
            length_fit, cell = points[-1]
            power = 1 if check_group[method] else 2
            estimate = cell["time"] * (check / length_fit) ** power
            status, peak = "fitted", "-"
            if check < args.fit_lengths[0]:
                pass
            elif estimate <= args.verify_max_seconds:
                result = runner.run(
                    method=method,
                    length=check,
                    steps=1,
                    group=check_group[method],
                )
                if result:
                    peak = fmt_gib(result["peak"])
                    status = "measured" if result["peak"] <= budget * GIB else "OVER"
                    # the line through the longest fitted step and the check (both measured) moves the prediction
                    slope = (result["peak"] - cell["peak"]) / (check - length_fit)
                    if slope > 0:
                        corrected = int(check + (budget * GIB - result["peak"]) / slope)
                        status += f"; secant through L={length_fit} and the check: ~{corrected} tokens"
            else:
                peak = f"(~{estimate / 60:.0f} min)"
            print(
                f"{METHOD_NAMES[method]:<20} {budget:>5} G {predicted:>15} {check:>8} {peak:>14} {status:>10}"
            )


def mode_memprofile(runner: Runner, args):
    """What is live at the peak of one step, by tensor class (step_bench/tracker.py), per method side by side."""
    model = "tiny" if args.quick else "smollm2"
    length = args.memprofile_length
    cells = {}
    for method in args.memprofile_methods:
        result = runner.run(model=model, method=method, length=length, steps=1, track=True)
        if result and result.get("tracked"):
            cells[method] = result
    print(
        f"\n## memprofile: live at the peak of one step, by tensor class ({model}, L={length}, {args.dtype}; MiB of "
        "torch's CPU allocations made during the step, from the allocator's events)"
    )
    if not cells:
        return
    classes: list[str] = []
    for r in cells.values():
        classes += [c for c in r["tracked"]["classes"] if c not in classes]
    mib = 2**20
    header = f"{'tensor class':<58}" + "".join(f" {METHOD_NAMES[m][:18]:>18}" for m in cells)
    print(header)
    for c in classes:
        values = [r["tracked"]["classes"].get(c, 0) for r in cells.values()]
        if max(values) >= mib / 2:
            print(f"{c[:58]:<58}" + "".join(f" {v / mib:>18.1f}" for v in values))
    print(
        f"{'step peak (all classes)':<58}"
        + "".join(f" {r['tracked']['peak'] / mib:>18.1f}" for r in cells.values())
    )
    print(
        f"{'before the step: weights + AdamW state':<58}"
        + "".join(f" {(r['weights'] + r['optimizer']) / mib:>18.1f}" for r in cells.values())
    )
    for m, r in cells.items():
        at = r["tracked"]["peak_at"]
        print(f"peak of {METHOD_NAMES[m]}: {at}")
