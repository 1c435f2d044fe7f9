"""S2-Attn op benchmark: forward + backward time of s2_attention vs full causal SDPA vs plain grouping.

Side by side in one run, on the same inputs:
  full     causal SDPA over the whole sequence (what LoRA without S2 pays);
  grouped  causal SDPA inside groups of G = ratio * L, no shift: the cost floor of any grouping scheme;
  s2       hf_longlora's s2_attention (half the heads shifted by G/2, "partition" mode).

Printed ratios: speedup = full / s2 (target >= 3.6x at 16k with ratio 0.25; the FLOP limit is 4x) and
overhead = s2 / grouped - 1 (target <= 5%).

    python benchmarks/attention.py            # 4k, 8k, 16k, 32k; bf16 and fp32; head dim 64 and 128
    python benchmarks/attention.py --quick    # a seconds-long smoke run (CI)
"""

from __future__ import annotations

import argparse
import os
import platform
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
    args = parser.parse_args()
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
