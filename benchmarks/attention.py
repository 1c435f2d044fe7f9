"""S2-Attn op benchmark: forward + backward time of s2_attention vs full causal SDPA vs plain grouping.

Side by side in one run, on the same inputs:
  full     causal SDPA over the whole sequence (what LoRA without S2 pays);
  grouped  causal SDPA inside groups of G = ratio * L, no shift: the cost floor of any grouping scheme;
  s2       hf_longlora's s2_attention (half the heads shifted by G/2, "partition" mode).

Printed ratios: speedup = full / s2 (target >= 3.6x at 16k with ratio 0.25; the FLOP limit is 4x) and
overhead = s2 / grouped - 1 (target <= 5%).

    python benchmarks/attention.py            # 4k, 8k, 16k, 32k; bf16 and fp32; head dim 64 and 128
    python benchmarks/attention.py --quick    # a seconds-long smoke run (CI)

--memory instead measures the peak extra memory (RSS above the inputs) of one forward + backward of each
backend's attention function as the model calls it, each cell in a fresh subprocess: transformers' ``sdpa``
(what LoRA with full attention runs) vs ``s2_attention``, with GQA key/value heads (4 query, 2 KV heads, head
dim 128, as in benchmarks/train_step.py):

    python benchmarks/attention.py --memory   # 4k, 8k, 16k, 32k; bf16 and fp32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention

import hf_longlora

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(length, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # transformers' layout: (B, H, L, D) views of (B, L, H, D) tensors
    return [
        torch.randn(1, length, heads, head_dim, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)
        for _ in range(3)
    ]


def full_attention(q, k, v, group):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def grouped_attention(q, k, v, group):
    """Plain grouping, no shift: (1, H, L, D) -> (L/G, H, G, D) views -> causal SDPA."""
    _, heads, length, dim = q.shape
    n = length // group

    def split(t):
        return t.transpose(1, 2).reshape(n, group, heads, dim).transpose(1, 2)  # (n, H, G, D)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)  # (n, H, G, D)
    return out.transpose(1, 2).reshape(1, length, heads, dim)


def make_s2(heads, head_dim, ratio):
    config = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=8,
        s2_group_size_ratio=ratio,
    )
    module = LlamaAttention(config, layer_idx=0).train()

    def s2(q, k, v, group):
        return hf_longlora.s2_attention_forward(module, q, k, v, None, scaling=head_dim**-0.5)[0]

    return s2


def time_fwd_bwd(fn, inputs, group, repeats):
    """Best wall time of forward + backward over `repeats` runs."""
    grad = None
    best = float("inf")
    for _ in range(repeats):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        out = fn(*inputs, group)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        best = min(best, time.perf_counter() - start)
    return best


def warm_up(fns, heads, head_dim, dtype, ratio):
    """One small call of each function, so one-time costs (kernel selection, allocator) are not timed."""
    inputs = make_inputs(1024, heads, head_dim, dtype)
    for fn in fns:
        time_fwd_bwd(fn, inputs, int(1024 * ratio), 1)


def memory_cell(backend: str, dtype_name: str, length: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """Peak RSS above the inputs during one fwd + bwd of a backend's attention function (run in a subprocess)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=8,
        s2_group_size_ratio=0.25,
    )
    module = LlamaAttention(config, layer_idx=0).train()
    fn = hf_longlora.s2_attention_forward if backend == "s2" else sdpa_attention_forward
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, length, h, head_dim, generator=g, dtype=dtype).transpose(1, 2).requires_grad_(True)
        for h in (heads, kv_heads, kv_heads)
    )
    grad = torch.randn(1, length, heads, head_dim, generator=g, dtype=dtype)
    small = [t[:, :, :256].detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(module, *small, None, scaling=head_dim**-0.5, is_causal=True)[0]  # warm-up at 256 tokens
    out.backward(grad[:, :256])
    del out, small
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    start = time.perf_counter()
    out = fn(module, q, k, v, None, scaling=head_dim**-0.5, is_causal=True)[0]
    out.backward(grad)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
    return {"extra": max(0, peak - before), "inputs": inputs, "time": elapsed}


def memory_table(args) -> None:
    heads, kv_heads, head_dim = 4, 2, 128
    print(
        f"# peak extra memory of one attention fwd+bwd (RSS above inputs, fresh process per cell); {heads} heads, "
        f"{kv_heads} KV heads, head dim {head_dim}, ratio 0.25"
    )
    header = f"{'dtype':>5} {'L':>6} {'q+k+v MiB':>10} {'sdpa MiB':>9} {'s2 MiB':>8} {'s2/sdpa':>8} {'sdpa s':>7} {'s2 s':>6}"
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        for length in args.lengths:
            cells = {}
            for backend in ("sdpa", "s2"):
                if args.quick:  # the smoke run: in this process (the numbers then mean little)
                    cells[backend] = memory_cell(backend, dtype_name, length, heads, kv_heads, head_dim)
                    continue
                cell = json.dumps([backend, dtype_name, length, heads, kv_heads, head_dim])
                proc = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--memory-cell", cell],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-2000:])
                cells[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
            mib = 2**20
            sd, s2 = cells["sdpa"], cells["s2"]
            print(
                f"{dtype_name:>5} {length:>6} {sd['inputs'] / mib:>10.0f} {sd['extra'] / mib:>9.0f} "
                f"{s2['extra'] / mib:>8.0f} {s2['extra'] / max(sd['extra'], 1):>7.2f}x {sd['time']:>7.2f} "
                f"{s2['time']:>6.2f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (CI smoke run)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per cell (best is kept)")
    parser.add_argument(
        "--memory", action="store_true", help="peak extra memory of sdpa vs s2 (GQA), per cell"
    )
    parser.add_argument("--memory-cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_cell:
        print(json.dumps(memory_cell(*json.loads(args.memory_cell))))
        return
    if args.memory:
        if args.quick:
            args.lengths = [512]
            args.dtypes = ["fp32"]
        memory_table(args)
        return
    if args.quick:
        args.lengths, args.head_dims, args.repeats = [512, 1024], [64], 1

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.heads} heads, ratio {args.ratio}, fwd+bwd, best of {args.repeats}"
    )
    header = f"{'dtype':>5} {'D':>4} {'L':>6} {'full s':>8} {'grouped s':>10} {'s2 s':>8} {'speedup':>8} {'overhead':>9}"
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        for head_dim in args.head_dims:
            s2 = make_s2(args.heads, head_dim, args.ratio)
            warm_up(
                [full_attention, grouped_attention, s2], args.heads, head_dim, DTYPES[dtype_name], args.ratio
            )
            for length in args.lengths:
                group = int(length * args.ratio)
                inputs = make_inputs(length, args.heads, head_dim, DTYPES[dtype_name])
                t_full = time_fwd_bwd(full_attention, inputs, group, args.repeats)
                t_grouped = time_fwd_bwd(grouped_attention, inputs, group, args.repeats)
                t_s2 = time_fwd_bwd(s2, inputs, group, args.repeats)
                print(
                    f"{dtype_name:>5} {head_dim:>4} {length:>6} {t_full:>8.3f} {t_grouped:>10.3f} {t_s2:>8.3f} "
                    f"{t_full / t_s2:>7.2f}x {100 * (t_s2 / t_grouped - 1):>8.1f}%",
                    flush=True,
                )


if __name__ == "__main__":
    main()
