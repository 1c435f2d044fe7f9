"""Per-rank memory of one LongLoRA training step with the sequence split across processes (DeepSpeed's Ulysses).

For each length L and each sequence-parallel size sp, one fresh ``torchrun`` job of sp CPU processes (gloo) runs a
LongLoRA step (forward, backward, AdamW) of SmolLM2-135M's architecture (random weights: memory and time do not
depend on them; 9 query / 3 KV heads, so sp divides 9: 1 or 3) on one sequence of L tokens, activation
checkpointing on, the chunked loss, S2 groups of a fixed size. Printed per cell: the largest peak RSS over the ranks
(``ru_maxrss``, with ``MALLOC_MMAP_THRESHOLD_`` so that freed buffers leave the process at once), the step's wall
time; per length the ratio of per-rank peaks; then a linear fit of peak vs L per sp and the longest L it predicts
within a per-rank budget.

    python benchmarks/sequence_parallel.py                       # L = 3072, 6144, 12288; sp = 1, 3
    python benchmarks/sequence_parallel.py --quick               # a tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    import hf_longlora
    from hf_longlora.attention.ulysses import register_s2_ulysses
    from hf_longlora.training.loss import causal_lm_loss
    from hf_longlora.training.sequence_parallel import shard_batch

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    if args.quick:
        config = LlamaConfig(
            hidden_size=72, num_attention_heads=9, num_key_value_heads=3, intermediate_size=128,
            num_hidden_layers=2, vocab_size=256, max_position_embeddings=args.length,
        )  # fmt: skip
    else:
        from hf_longlora.adapters.smollm2 import smollm2_checkpoint

        config = AutoConfig.from_pretrained(smollm2_checkpoint())
        if args.length > config.max_position_embeddings:
            hf_longlora.extend_context(config, args.length)
    config.s2_group_size = args.group
    config.use_cache = False
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="s2_attention", dtype=dtype)
    model = hf_longlora.get_longlora_model(model, hf_longlora.LongLoraConfig())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if world > 1:
        register_s2_ulysses(model, world)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1))
    batch = shard_batch({"input_ids": ids, "position_ids": torch.arange(args.length)[None]}, rank, world)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.train()
    start = time.perf_counter()
    tokens = torch.tensor((batch["shift_labels"] != -100).sum().item())
    dist.all_reduce(tokens)
    loss = causal_lm_loss(model, batch, num_items_in_batch=tokens)
    loss.backward()
    for param in model.parameters():
        if param.grad is not None and world > 1:
            dist.all_reduce(param.grad)
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = [None] * world
    dist.all_gather_object(rows, {"peak": peak, "rss_start": rss_start, "seconds": seconds})
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_cell(length: int, sp: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cell.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sp}", __file__,
            "--worker", "--length", str(length), "--group", str(args.group), "--dtype", args.dtype, "--out", str(out),
        ] + (["--quick"] if args.quick else [])  # fmt: skip
        threads = max(1, (os.cpu_count() or 1) // sp)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold),
        }
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
        if result.returncode != 0:
            raise RuntimeError(f"L={length} sp={sp} failed:\n{result.stderr[-3000:]}")
        rows = json.loads(out.read_text())
    return {
        "length": length, "sp": sp, "peak": max(r["peak"] for r in rows), "seconds": max(r["seconds"] for r in rows),
        "rss_start": max(r["rss_start"] for r in rows),
    }  # fmt: skip


def linear_fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[3072, 6144, 12288])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1, 3], help="sequence-parallel sizes (divide 9)"
    )
    parser.add_argument("--group", type=int, default=1024, help="S2 group size (fixed: time linear in L)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--budget", type=float, default=8.0, help="per-rank budget in GiB for the prediction")
    parser.add_argument("--mmap-threshold", type=int, default=65536)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--quick", action="store_true", help="tiny model, L = 48 and 96, seconds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.lengths, args.group = [48, 96], 8
    import torch

    print(
        f"# one LongLoRA step per cell, {'tiny Llama 9/3 heads' if args.quick else 'SmolLM2-135M'}, {args.dtype}, "
        f"S2 group {args.group}; CPU {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores shared by the "
        f"sp processes; memory = max over ranks of peak RSS (ru_maxrss, MALLOC_MMAP_THRESHOLD_={args.mmap_threshold})"
    )
    cells = []
    for length in args.lengths:
        for sp in args.sizes:
            cell = run_cell(length, sp, args)
            cells.append(cell)
            print(
                f"L={length:>6} sp={sp}: per-rank peak {cell['peak'] / GIB:6.2f} GiB (process before the model "
                f"{cell['rss_start'] / GIB:.2f}), step {cell['seconds']:7.1f} s",
                flush=True,
            )
    base = min(args.sizes)
    print(f"\n{'L':>7} " + " ".join(f"{f'sp={sp} GiB':>10}" for sp in args.sizes) + f" {'ratio':>7}")
    for length in args.lengths:
        row = {c["sp"]: c for c in cells if c["length"] == length}
        ratio = row[base]["peak"] / row[max(args.sizes)]["peak"]
        print(
            f"{length:>7} "
            + " ".join(f"{row[sp]['peak'] / GIB:>10.2f}" for sp in args.sizes)
            + f" {ratio:>6.2f}x"
        )
    print(f"\nlinear fit peak = a + b * L per sp, longest L predicted within {args.budget} GiB per rank:")
    for sp in args.sizes:
        points = [(c["length"], c["peak"]) for c in cells if c["sp"] == sp]
        a, b = linear_fit([p[0] for p in points], [p[1] for p in points])
        longest = int((args.budget * GIB - a) / b) if b > 0 else float("inf")
        print(f"sp={sp}: a = {a / GIB:.2f} GiB, b = {b / 1024:.1f} KiB/token -> L <= {longest}")


if __name__ == "__main__":
    main()
