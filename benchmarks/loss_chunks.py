"""The fused chunked loss alone: time and memory per ``chunk_size``, SmolLM2's LM head (49152 x 576, tied, trained).

Each cell is one forward + backward of ``chunked_causal_lm_loss`` over L bf16 hidden states in a fresh subprocess
(``MALLOC_MMAP_THRESHOLD_=131072``, so peak RSS follows live memory); memory is the cell's peak RSS minus its RSS
just before the loss (the hidden states and the head existed already). The head is fp32 and trained (LongLoRA's
trained copy of the tied embedding) or bf16 and frozen (LoRA on a bf16 base). ``auto`` is Liger-Kernel's rule for
its fused linear cross-entropy: chunks of ``next_pow2(ceil(L / ceil(V / H)))`` tokens, so one chunk's logits hold
about as many numbers as the hidden states of the whole sequence.

    python benchmarks/loss_chunks.py                 # L = 8192; chunks auto, 128, 256, 512, 1024 (about 4 minutes)
    python benchmarks/loss_chunks.py --quick         # a small head, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def worker(cfg: dict) -> dict:
    import torch

    import hf_longlora.training.loss as loss_module
    from hf_longlora.training.loss import chunked_causal_lm_loss

    loss_module._VOCAB_SLICE = cfg["vocab_slice"]
    loss_module._CAST_SLICE = cfg["cast_slice"]
    torch.manual_seed(0)
    vocab, width, length = cfg["vocab"], cfg["width"], cfg["length"]
    head = torch.nn.Linear(width, vocab, bias=False)
    if not cfg["trained"]:
        head = head.to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(1, length, width, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, length))
    times = []
    for repeat in range(cfg["repeats"] + 1):
        hidden.grad = head.weight.grad = None
        if repeat == 1:  # after the warm-up: what the loss itself adds
            with open("/proc/self/statm") as f:
                before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=cfg["chunk"], fused=True)
        loss.backward()
        if repeat:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**cfg, "time": min(times), "extra": peak - before, "loss": loss.item()}


def liger_chunk(length: int, vocab: int, width: int) -> int:
    per = -(-vocab // width)  # ceil(V / H)
    return 1 << max(0, (-(-length // per) - 1).bit_length())  # next power of two of ceil(L / per)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--chunks", nargs="+", default=["auto", "128", "256", "512", "1024"])
    parser.add_argument(
        "--vocab-slices", type=int, nargs="+", default=[8192], help="vocabulary rows per bf16 product"
    )
    parser.add_argument(
        "--cast-slices",
        type=int,
        nargs="+",
        default=[2048],
        help="rows of a trained fp32 head cast to bf16 per product (the library's default 2048; a vocabulary "
        "slice's size casts the whole slice at once)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    vocab, width = (49152, 576) if not args.quick else (2048, 64)
    if args.quick:
        args.lengths, args.repeats, args.chunks = [512], 1, ["auto", "128", "1024"]
    import torch

    print(
        f"# fused chunked loss, head {vocab} x {width}, bf16 hidden states under autocast, "
        f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"{'L':>6} {'head':>14} {'slice':>5} {'cast':>5} {'chunk':>9} | {'s (best)':>8} {'vs ref':>7} | "
        f"{'loss MiB':>8} {'vs ref':>7}"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    for length in args.lengths:
        for trained in (True, False):
            rows = []
            cells = [(c, v, p) for v in args.vocab_slices for p in args.cast_slices for c in args.chunks]
            if not trained:  # a frozen bf16 head is not cast
                cells = list(dict.fromkeys((c, v, args.cast_slices[0]) for c, v, _ in cells))
            for chunk, vocab_slice, cast_slice in cells:
                size = liger_chunk(length, vocab, width) if chunk == "auto" else int(chunk)
                cfg = dict(vocab=vocab, width=width, length=length, chunk=size, trained=trained)
                cfg["vocab_slice"] = vocab_slice
                cfg["cast_slice"] = cast_slice
                cfg["repeats"] = args.repeats
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(cfg)],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(f"# FAILED {cfg}: {proc.stderr[-800:]}")
                    continue
                rows.append((chunk, json.loads(lines[-1][7:])))
            # the reference: chunk 1024 with the first vocabulary and cast slices (the library's defaults)
            ref = next((r for c, r in rows if r["chunk"] == 1024), rows[-1][1] if rows else None)
            for chunk, r in rows:
                label = f"{r['chunk']}" + (" (auto)" if chunk == "auto" else "")
                print(
                    f"{length:>6} {'fp32, trained' if trained else 'bf16, frozen':>14} {r['vocab_slice']:>5} "
                    f"{r['cast_slice'] if trained else '-':>5} {label:>9} | "
                    f"{r['time']:>8.3f} {r['time'] / ref['time']:>6.2f}x | {r['extra'] / 2**20:>8.0f} "
                    f"{r['extra'] / ref['extra']:>6.2f}x"
                )


if __name__ == "__main__":
    main()
