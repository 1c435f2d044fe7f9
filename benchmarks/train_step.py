"""Training-step benchmark: LongLoRA vs LoRA with full attention vs full fine-tuning, time and peak memory.

One training step = forward + backward + AdamW step on one sequence of L random tokens, with activation
checkpointing and the chunked loss (hf_longlora.loss) unless told otherwise. Methods:

  longlora   s2_attention + LoRA r8 on q/k/v/o + trainable embeddings and norms (hf_longlora.get_longlora_model)
  lora       sdpa (full causal attention) + plain LoRA r8 on q/k/v/o (peft.LoraConfig)
  full       sdpa + every parameter trained (full fine-tuning)
  longlora_full  the LongLoRA adapter with full attention (sdpa): isolates what S2-Attn itself saves

Every measured cell runs in a fresh subprocess, so its peak RSS (ru_maxrss; max_memory_allocated on CUDA) is its
own. Each subprocess does one warm-up step at 512 tokens (allocates the optimizer state) then the timed step(s)
at L. Cells are interleaved (for each repeat: for each length: each method) and the best time is kept, so the
ratios printed side by side are robust to other load on a shared machine.

Modes (each prints its table and ratios; run several with --modes):

  speed      tokens/s and peak memory of the three methods at --lengths (ratios: LongLoRA vs LoRA-full speed,
             LongLoRA vs full-FT memory), plus LongLoRA with a fixed --fixed-group (cost per token vs L)
  budget     peak memory at a few lengths per method, a linear fit, the predicted longest context per --budgets
             (GiB), and a check run at the predicted length where --verify-max-seconds allows
  smollm2    SmolLM2-135M: LongLoRA step at 4k and 8k with S2 vs full attention; LongLoRA vs full FT memory at
             8k with the memory broken down (weights, gradients, optimizer state, activations)
  ckpt       activation checkpointing on vs off (time and memory)
  loss       chunked loss vs the model's own loss (full fp32 logits): memory and time
  profile    torch.profiler of one LongLoRA and one LoRA-full step (where the time goes)

    python benchmarks/train_step.py --modes speed --dtype fp32
    python benchmarks/train_step.py --quick       # seconds: every mode at tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time

GIB = 1024**3
METHOD_NAMES = {
    "longlora": "LongLoRA (S2)",
    "lora": "LoRA, full attn",
    "full": "full FT, full attn",
    "longlora_full": "LongLoRA adapter, full attn",
}


# ---------------------------------------------------------------------------------------------- the worker


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def bench_config(cfg: dict):
    from transformers import LlamaConfig

    if cfg["model"] == "tiny":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            vocab_size=1000,
            max_position_embeddings=4096,
        )
    # the benchmark model: 4 layers, hidden 512, head dim 128 (4 heads, 2 KV heads: GQA 2:1), Llama-2's MLP ratio
    return LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=32000,
        max_position_embeddings=4096,
    )


def build_model(cfg: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import hf_longlora
    from hf_longlora import LongLoraConfig, configure_s2, extend_context, get_longlora_model

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg["dtype"]]
    method = cfg["method"]
    attn = cfg.get("attn") or (hf_longlora.S2_ATTENTION if method == "longlora" else "sdpa")
    torch.manual_seed(0)
    if cfg["model"] == "smollm2":
        from hf_longlora.offline import smollm2_checkpoint

        model = AutoModelForCausalLM.from_pretrained(
            smollm2_checkpoint(), dtype=dtype, attn_implementation=attn
        )
        if cfg["length"] > model.config.max_position_embeddings:
            raise ValueError("SmolLM2 runs here are within its 8k context")
    else:
        config = bench_config(cfg)
        if cfg["length"] > config.max_position_embeddings:
            extend_context(config, cfg["length"])  # position interpolation, as LongLoRA trains
        config._attn_implementation = attn
        model = LlamaForCausalLM(config).to(dtype)
    if attn == hf_longlora.S2_ATTENTION:
        configure_s2(model, group_size_ratio=cfg["ratio"], group_size=cfg.get("group"))
    model.config.use_cache = False
    if method in ("longlora", "longlora_full"):
        model = get_longlora_model(model, LongLoraConfig())  # r=8, alpha=16, q/k/v/o + embeddings + norms
    elif method == "lora":
        model = get_peft_model(
            model,
            LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
            ),
        )
    elif method != "full":
        raise ValueError(method)
    if cfg["ckpt"]:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def component_sizes(model, optimizer) -> dict:
    """Bytes of weights (all parameters, once: tied ones are shared), gradients and optimizer state."""
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = [p for p in params if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if hasattr(t, "numel") and t.dim() > 0
    )
    return {
        "weights": weights,
        "grads": grads,
        "optimizer": state,
        "trainable_params": sum(p.numel() for p in trainable),
        "params": sum(p.numel() for p in params),
    }


def worker(cfg: dict) -> dict:
    import torch

    from hf_longlora.loss import causal_lm_loss

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rss_start = current_rss()
    model = build_model(cfg).to(device)
    rss_model = current_rss()
    vocab = model.config.get_text_config().vocab_size
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0
    )
    gen = torch.Generator().manual_seed(0)

    def step(length: int) -> float:
        ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
        batch = {"input_ids": ids, "labels": ids}
        cpu_start = time.process_time()
        start = time.perf_counter()
        if cfg["loss"] in ("chunked", "checkpointed"):  # fused where the head allows it / always recompute
            fused = None if cfg["loss"] == "chunked" else False
            loss = causal_lm_loss(model, batch, chunk_size=cfg["chunk"], fused=fused)
        else:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        cpu_times.append(time.process_time() - cpu_start)  # all threads of this process: robust to other load
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return elapsed

    cpu_times: list[float] = []

    step(min(cfg.get("warmup", 512), cfg["length"]))  # warm-up: kernel selection, optimizer state
    rss_warm = current_rss()
    sizes = component_sizes(model, optimizer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if cfg.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            times = [step(cfg["length"])]
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=cfg["profile"]), flush=True)
    else:
        times = [step(cfg["length"]) for _ in range(cfg["steps"])]
    result = dict(cfg)
    result.update(
        times=times,
        cpu_times=cpu_times[-len(times) :],
        peak=torch.cuda.max_memory_allocated() if cuda else peak_rss(),
        rss_start=rss_start,
        rss_model=rss_model,
        rss_warm=rss_warm,
        threads=torch.get_num_threads(),
        **sizes,
    )
    return result


# ---------------------------------------------------------------------------------------------- the driver


KEYS = ("model", "method", "length", "dtype", "ckpt", "loss", "group")
_CELL_LINE = re.compile(
    r"#\s+(?P<model>\w+) (?P<method>\w+)\s+L=\s*(?P<length>\d+) (?P<dtype>\w+) ckpt=(?P<ckpt>\d) "
    r"loss=(?P<loss>\w+) group=(?P<group>\w+): step (?P<time>[\d.]+) s, peak (?P<peak>[\d.]+) GiB"
    r"(?: \(wall \d+ s, cpu (?P<cpu>[\d.]+) s\))?"
)


def load_results(paths) -> list[dict]:
    """Cells from earlier runs: --save files (one JSON per line) or -v logs (their per-cell lines)."""
    results = []
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.startswith("{"):
                    results.append(json.loads(line))
                elif m := _CELL_LINE.match(line):
                    d = m.groupdict()
                    results.append(
                        dict(
                            model=d["model"],
                            method=d["method"],
                            length=int(d["length"]),
                            dtype=d["dtype"],
                            ckpt=d["ckpt"] == "1",
                            loss=d["loss"],
                            group=None if d["group"] == "None" else int(d["group"]),
                            times=[float(d["time"])],
                            cpu_times=[float(d["cpu"])] if d["cpu"] else [],
                            peak=float(d["peak"]) * GIB,
                            source=path,
                        )
                    )
    return results


class Runner:
    def __init__(self, args):
        self.args = args
        self.results: list[dict] = load_results(args.load or [])

    def run(self, **cfg) -> dict | None:
        a = self.args
        base = dict(
            model="tiny" if a.quick else "bench",
            dtype=a.dtype,
            ratio=a.ratio,
            group=None,
            ckpt=True,
            loss="chunked",
            chunk=a.chunk,
            steps=a.steps,
            threads=a.threads,
        )
        base.update(cfg)
        if a.reuse or a.tables_only:  # a cell measured before (--load) is not run again
            done = [r for r in self.results if all(r.get(k) == base[k] for k in KEYS)]
            if done:
                return done[0]
        if a.tables_only:
            return None
        if a.quick:  # the smoke run: in this process (peak RSS is then the process's, not the cell's)
            result = worker(base)
            result["wall"] = 0.0
            self.results.append(result)
            return result
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(base)]
        if a.nice:
            cmd = ["nice", "-n", str(a.nice), *cmd]
        env = dict(os.environ)
        if (
            a.malloc_mmap_threshold
        ):  # glibc returns freed large buffers at once, so peak RSS follows live memory
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(a.malloc_mmap_threshold))
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if base.get("profile"):
            print(proc.stdout.split("RESULT ")[0], flush=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"# FAILED {base}: {proc.stderr[-1500:]}", flush=True)
            return None
        result = json.loads(lines[-1][len("RESULT ") :])
        result["wall"] = wall
        self.results.append(result)
        if a.save:
            with open(a.save, "a") as f:
                f.write(json.dumps(result) + "\n")
        if a.verbose:
            print(
                f"#   {result['model']} {result['method']:<13} L={result['length']:>6} {result['dtype']} "
                f"ckpt={int(result['ckpt'])} loss={result['loss']} group={result['group']}: "
                f"step {min(result['times']):.2f} s, peak {result['peak'] / GIB:.3f} GiB (wall {wall:.0f} s, "
                f"cpu {min(result['cpu_times']):.1f} s)",
                flush=True,
            )
        return result


def best(results, **match):
    rows = [r for r in results if all(r.get(k) == v for k, v in match.items())]
    if not rows:
        return None
    cpu = [min(r["cpu_times"]) for r in rows if r.get("cpu_times")]
    return {
        "time": min(min(r["times"]) for r in rows),
        "cpu": min(cpu) if cpu else None,
        "peak": max(r["peak"] for r in rows),
        "n": len(rows),
        "row": rows[0],
    }


def bench_model(args) -> str:
    return "tiny" if args.quick else "bench"


def fmt_gib(x):
    return f"{x / GIB:.2f}"


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


def mode_smollm2(runner: Runner, args):
    lengths = args.smollm2_lengths
    model = "smollm2" if not args.quick else "tiny"
    mem_length = lengths[-1]
    if "speed" in args.smollm2_parts:
        for _ in range(args.repeats):
            for length in lengths:
                runner.run(model=model, method="longlora", length=length)
                runner.run(model=model, method="longlora_full", length=length)
    elif "memory" in args.smollm2_parts:
        runner.run(model=model, method="longlora", length=mem_length, steps=1)
    if "memory" in args.smollm2_parts:
        runner.run(model=model, method="full", length=mem_length, steps=1)
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
    print(
        f"\n## SmolLM2-135M at L={mem_length}: peak memory LongLoRA vs full fine-tuning (AdamW), and its parts (GiB)"
    )
    print(
        f"{'method':<20} {'peak':>6} {'process':>8} {'weights':>8} {'grads':>6} {'AdamW':>6} {'activ.+temp':>11} "
        f"{'trainable':>10}"
    )
    cells = {}
    for method in ("longlora", "full"):
        cell = best(runner.results, model=model, method=method, length=mem_length)
        if cell is None:
            continue
        cells[method] = cell
        r = cell["row"]
        # the process before the model (interpreter, torch, transformers) is rss_start; the step's activations and
        # temporaries are what the peak holds beyond that, the weights, the gradients and the optimizer state
        activ = cell["peak"] - r["rss_start"] - r["weights"] - r["grads"] - r["optimizer"]
        print(
            f"{METHOD_NAMES[method]:<20} {fmt_gib(cell['peak']):>6} {fmt_gib(r['rss_start']):>8} {fmt_gib(r['weights']):>8} "
            f"{fmt_gib(r['grads']):>6} {fmt_gib(r['optimizer']):>6} {fmt_gib(activ):>11} {r['trainable_params'] / 1e6:>9.1f}M"
        )
    if len(cells) == 2:
        ratio = cells["full"]["peak"] / cells["longlora"]["peak"]
        net = (cells["full"]["peak"] - cells["full"]["row"]["rss_start"]) / (
            cells["longlora"]["peak"] - cells["longlora"]["row"]["rss_start"]
        )
        print(f"peak memory full FT / LongLoRA: {ratio:.2f}x (without the process baseline: {net:.2f}x)")


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


def mode_profile(runner: Runner, args):
    for method in ("longlora", "lora"):
        print(f"\n## profile: {METHOD_NAMES[method]} at L={args.profile_length} (self CPU time, top ops)")
        runner.run(method=method, length=args.profile_length, profile=args.profile_rows, steps=1)


MODES = {
    "speed": mode_speed,
    "budget": mode_budget,
    "smollm2": mode_smollm2,
    "ckpt": mode_ckpt,
    "loss": mode_loss,
    "profile": mode_profile,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and lengths, every mode (CI smoke run)"
    )
    parser.add_argument("--modes", nargs="+", default=["speed"], choices=list(MODES))
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["longlora", "lora", "full"],
        help="speed mode: the methods to run ('none': only LongLoRA with --fixed-group)",
    )
    parser.add_argument("--ratio", type=float, default=0.25, help="S2 group size ratio")
    parser.add_argument(
        "--fixed-group", type=int, default=2048, help="also run LongLoRA with this fixed group (0: no)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved repeats of each cell (best time kept)"
    )
    parser.add_argument("--steps", type=int, default=1, help="timed steps per subprocess")
    parser.add_argument("--chunk", type=int, default=1024, help="loss chunk size (tokens)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)"
    )
    parser.add_argument("--nice", type=int, default=0, help="run the workers under nice -n N")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=131072,
        help="MALLOC_MMAP_THRESHOLD_ of the workers (bytes; 0: glibc's adaptive default, which keeps freed "
        "buffers and inflates peak RSS)",
    )
    parser.add_argument("--fit-lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--budgets", type=float, nargs="+", default=[4, 8, 16], help="GiB")
    parser.add_argument("--verify-max-seconds", type=float, default=600)
    parser.add_argument("--smollm2-lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument(
        "--smollm2-parts",
        nargs="+",
        default=["speed", "memory"],
        choices=["speed", "memory"],
        help="smollm2 mode",
    )
    parser.add_argument("--ckpt-lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--loss-lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--profile-length", type=int, default=16384)
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--save", help="append every measured cell (JSON) to this file")
    parser.add_argument("--load", nargs="+", help="cells measured before: --save files or -v logs")
    parser.add_argument("--reuse", action="store_true", help="do not re-run cells found in --load")
    parser.add_argument(
        "--tables-only", action="store_true", help="run nothing: print the tables from the --load cells"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every cell as it finishes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.quick:
        args.lengths, args.fit_lengths, args.smollm2_lengths = [128, 256], [128, 256], [128, 256]
        args.ckpt_lengths, args.loss_lengths, args.profile_length, args.profile_rows = [128], [128], 128, 3
        args.fixed_group, args.budgets, args.repeats, args.verify_max_seconds = 32, [0.5], 1, 0
        if "--dtype" not in sys.argv:
            args.dtype = "fp32"
        if "--modes" not in sys.argv:
            args.modes = list(MODES)

    import torch

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads or torch.get_num_threads()} threads, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}; {'tiny model' if args.quick else 'benchmark model'}; "
        f"{args.dtype}; modes {args.modes}",
        flush=True,
    )
    runner = Runner(args)
    for mode in args.modes:
        MODES[mode](runner, args)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
