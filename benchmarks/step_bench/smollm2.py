"""SmolLM2-135M: LongLoRA with S2 vs full attention at 4k/8k, and LongLoRA vs full fine-tuning memory at 8k with
its parts (weights, gradients, optimizer state, activations)."""

from __future__ import annotations

from .cells import METHOD_NAMES, Runner, best, fmt_gib


def mode_smollm2(runner: Runner, args):
    lengths = args.smollm2_lengths
    model = "smollm2" if not args.quick else "tiny"
    if "speed" in args.smollm2_parts:
        for _ in range(args.repeats):
            for length in lengths:
                runner.run(model=model, method="longlora", length=length)
                runner.run(model=model, method="longlora_full", length=length)
    if "memory" in args.smollm2_parts:
        for length in lengths:
            for method in args.smollm2_methods:
                runner.run(model=model, method=method, length=length, steps=1)
    print(
        f"\n## SmolLM2-135M ({args.dtype}, activation checkpointing, chunked loss): LongLoRA step, S2 vs full attention"
    )
    print(f"{'L':>6} | {'S2 tok/s':>9} {'full tok/s':>10} {'speedup':>8} | {'S2 GiB':>7} {'full GiB':>8}")
    for length in lengths:
        s2 = best(runner.results, model=model, method="longlora", length=length)
        full = best(runner.results, model=model, method="longlora_full", length=length)
        if s2 and full:
            print(
                f"{length:>6} | {length / s2['time']:>9.0f} {length / full['time']:>10.0f} {full['time'] / s2['time']:>7.2f}x | "
                f"{fmt_gib(s2['peak']):>7} {fmt_gib(full['peak']):>8}"
            )
    for length in lengths if "memory" in args.smollm2_parts else []:
        memory_table(runner, args, model, length)


def memory_table(runner: Runner, args, model: str, length: int):
    print(
        f"\n## SmolLM2-135M at L={length} ({args.dtype}): peak memory LongLoRA vs LoRA vs full fine-tuning (AdamW), "
        "and its parts (GiB; peak = the cell's own peak RSS)"
    )
    print(
        f"{'method':<20} {'peak':>6} {'process':>8} {'weights':>8} {'grads':>6} {'AdamW':>6} {'activ.+temp':>11} "
        f"{'trainable':>10}"
    )
    cells = {}
    for method in args.smollm2_methods:
        cell = best(runner.results, model=model, method=method, length=length, track=None, tiled_mlp=None)
        if cell is None:
            continue
        cells[method] = cell
        r = cell["row"]
        # the process before the model (interpreter, torch, transformers) is rss_start; the step's activations and
        # temporaries are what the peak holds beyond that, the weights, the gradients and the optimizer state
        cell["activ"] = cell["peak"] - r["rss_start"] - r["weights"] - r["grads"] - r["optimizer"]
        print(
            f"{METHOD_NAMES[method]:<20} {fmt_gib(cell['peak']):>6} {fmt_gib(r['rss_start']):>8} "
            f"{fmt_gib(r['weights']):>8} {fmt_gib(r['grads']):>6} {fmt_gib(r['optimizer']):>6} "
            f"{fmt_gib(cell['activ']):>11} {r['trainable_params'] / 1e6:>9.1f}M"
        )
    if "full" in cells and "longlora" in cells:
        ratio = cells["full"]["peak"] / cells["longlora"]["peak"]
        net = (cells["full"]["peak"] - cells["full"]["row"]["rss_start"]) / (
            cells["longlora"]["peak"] - cells["longlora"]["row"]["rss_start"]
        )
        print(f"peak memory full FT / LongLoRA: {ratio:.2f}x (without the process baseline: {net:.2f}x)")
    for other in (
        "lora",
        "longlora_full",
    ):  # plain LoRA; the same adapter with full attention (S2-Attn's part)
        if other in cells and "longlora" in cells:
            print(
                f"activations + temporaries LongLoRA / {METHOD_NAMES[other]}: "
                f"{fmt_gib(cells['longlora']['activ'])} / {fmt_gib(cells[other]['activ'])} GiB"
            )
