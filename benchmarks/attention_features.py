"""Attention sinks and logit soft-capping in the S2 op: what they cost, and what they cost models that have neither.

Forward + backward wall time of one attention call in training mode (1 sequence, 8 query / 2 KV heads, head dim
64, ratio 1/4, fp32), best of ``--repeats``, cells interleaved:

- **plain, before / after**: ``s2_attention_forward`` without sinks or softcap, in this tree and in the tree before
  sinks and softcap were added (commit efd0087, checked out with ``git worktree`` into a temporary folder and
  imported in a subprocess through ``PYTHONPATH``): the features must not slow down models without them;
- **sinks** (gpt-oss's ``s_aux``) and **softcap** (Gemma 2's 50.0): the S2 op against the model's own
  ``eager_attention_forward`` (full causal attention, what training with ``attn_implementation="eager"`` costs).

    python benchmarks/attention_features.py              # 4k and 8k
    python benchmarks/attention_features.py --quick      # 256 and 512 tokens, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "efd0087"  # the last commit before sinks and softcap
HEADS, KV_HEADS, DIM = 8, 2, 64


def _inputs(length: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, length, HEADS, DIM, generator=g).transpose(1, 2).requires_grad_(True)
    k, v = (
        torch.randn(1, length, KV_HEADS, DIM, generator=g).transpose(1, 2).requires_grad_(True) for _ in "kv"
    )
    return q, k, v


def _best_fwd_bwd(fn, length: int, repeats: int) -> float:
    import torch

    inputs = _inputs(length)
    best = float("inf")
    for _ in range(repeats):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        best = min(best, time.perf_counter() - start)
    return best


def _s2_module(model_type: str):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = AutoConfig.for_model(
        model_type, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
        num_hidden_layers=1, intermediate_size=8, vocab_size=8,
    )  # fmt: skip
    config.s2_group_size_ratio = 0.25
    config._attn_implementation = "eager"
    module = LlamaAttention(config, layer_idx=0).train()  # the S2 op reads only config and training
    module.num_key_value_groups = HEADS // KV_HEADS
    return module


def cell(kind: str, length: int, repeats: int) -> float:
    """One timing, in this process (its hf_longlora is whichever PYTHONPATH gives)."""
    import torch

    import hf_longlora

    scale = DIM**-0.5
    module = _s2_module("llama")
    if kind == "plain":
        return _best_fwd_bwd(
            lambda q, k, v: hf_longlora.s2_attention_forward(module, q, k, v, None, scaling=scale)[0],
            length,
            repeats,
        )
    # gpt-oss's eager reads the module's own sinks parameter; S2 gets the same tensor as s_aux
    module.sinks = torch.nn.Parameter(torch.randn(HEADS, generator=torch.Generator().manual_seed(3)))
    sinks = module.sinks
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    if kind == "s2-sinks":
        return _best_fwd_bwd(
            lambda q, k, v: hf_longlora.s2_attention_forward(module, q, k, v, None, scaling=scale, s_aux=sinks)[0],
            length, repeats,
        )  # fmt: skip
    if kind == "s2-softcap":
        return _best_fwd_bwd(
            lambda q, k, v: hf_longlora.s2_attention_forward(module, q, k, v, None, scaling=scale, softcap=50.0)[0],
            length, repeats,
        )  # fmt: skip
    from hf_longlora.attention.backend import additive_mask

    if kind == "eager-sinks":
        from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

        mask = additive_mask(causal, *_inputs(2)[:2])
        return _best_fwd_bwd(
            lambda q, k, v: gpt_oss_eager(module, q, k, v, mask, scaling=scale, dropout=0.0, s_aux=sinks)[0],
            length, repeats,
        )  # fmt: skip
    if kind == "eager-softcap":
        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager

        mask = additive_mask(causal, *_inputs(2)[:2])
        return _best_fwd_bwd(
            lambda q, k, v: gemma2_eager(module, q, k, v, mask, scaling=scale, dropout=0.0, softcap=50.0)[0],
            length, repeats,
        )  # fmt: skip
    raise ValueError(kind)


def run_cell(kind: str, length: int, repeats: int, package: Path | None = None) -> float:
    env = dict(os.environ)
    if package is not None:
        env["PYTHONPATH"] = str(package) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    command = [sys.executable, __file__, "--cell", json.dumps([kind, length, repeats])]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds of every cell (best is kept)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        kind, length, repeats = json.loads(args.cell)
        print(cell(kind, length, repeats))
        return
    if args.quick:
        args.lengths, args.repeats, args.rounds = [256, 512], 1, 1
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), BEFORE], check=True,
                       capture_output=True)  # fmt: skip
        try:
            times: dict = {}
            for _ in range(args.rounds):
                for length in args.lengths:
                    for name, kind, package in (
                        ("plain before", "plain", before), ("plain after", "plain", None),
                        ("s2 sinks", "s2-sinks", None), ("eager sinks", "eager-sinks", None),
                        ("s2 softcap", "s2-softcap", None), ("eager softcap", "eager-softcap", None),
                    ):  # fmt: skip
                        seconds = run_cell(kind, length, args.repeats, package)
                        key = (name, length)
                        times[key] = min(times.get(key, float("inf")), seconds)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True
            )
    print(
        f"# fwd+bwd of one attention call, 1 x {HEADS}/{KV_HEADS} heads x {DIM}, fp32, ratio 1/4, best of "
        f"{args.repeats} x {args.rounds} interleaved rounds; CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'L':>6} | {'plain before':>12} {'after':>8} {'change':>7} | {'S2 sinks':>8} {'eager':>8} {'speedup':>7} | "
          f"{'S2 softcap':>10} {'eager':>8} {'speedup':>7}")  # fmt: skip
    for n in args.lengths:
        t = {name: times[(name, n)] for name, _ in times if _ == n}
        print(
            f"{n:>6} | {t['plain before']:>11.3f}s {t['plain after']:>7.3f}s "
            f"{t['plain after'] / t['plain before'] - 1:>+6.1%} | {t['s2 sinks']:>7.3f}s {t['eager sinks']:>7.3f}s "
            f"{t['eager sinks'] / t['s2 sinks']:>6.2f}x | {t['s2 softcap']:>9.3f}s {t['eager softcap']:>7.3f}s "
            f"{t['eager softcap'] / t['s2 softcap']:>6.2f}x"
        )


if __name__ == "__main__":
    main()
