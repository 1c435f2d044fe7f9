"""Training-step benchmark: LongLoRA vs LoRA with full attention vs full fine-tuning, time and peak memory.

One training step = forward + backward + AdamW step on one sequence of L random tokens, with activation
checkpointing and the chunked loss (hf_longlora.training.loss) unless told otherwise. Methods:

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
  memprofile SmolLM2: what is live at the peak of one step, by tensor class (a tensor-level tracker on the
             allocator's events: step_bench/tracker.py), LongLoRA vs LoRA-full vs full FT
  longest    SmolLM2: one LongLoRA step at --longest-lengths (32k-128k) with a fixed group, the tiled MLP over
             the sequence (none / ours / DeepSpeed's TiledMLP) side by side, time per token and memory parts

    python benchmarks/train_step.py --modes speed --dtype fp32
    python benchmarks/train_step.py --quick       # seconds: every mode at tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from step_bench.cells import DTYPES, Runner, worker
from step_bench.longest import mode_longest
from step_bench.loss import mode_loss
from step_bench.memory import mode_budget, mode_memprofile
from step_bench.profiling import mode_profile
from step_bench.smollm2 import mode_smollm2
from step_bench.speed import mode_ckpt, mode_speed

MODES = {
    "speed": mode_speed,
    "budget": mode_budget,
    "smollm2": mode_smollm2,
    "ckpt": mode_ckpt,
    "loss": mode_loss,
    "profile": mode_profile,
    "longest": mode_longest,
    "memprofile": mode_memprofile,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and lengths, every mode (CI smoke run)"
    )
    parser.add_argument("--modes", nargs="+", default=["speed"], choices=list(MODES))
    parser.add_argument(
        "--dtype",
        default="bf16",
        choices=list(DTYPES),
        help="fp32; bf16 (a bf16 model, no autocast: full FT pure bf16, adapters with fp32 trained parameters); "
        "bf16-mixed (fp32 weights, autocast); bf16-base (bf16 frozen weights, fp32 trained ones, autocast)",
    )
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
    parser.add_argument(
        "--smollm2-methods", nargs="+", default=["longlora", "lora", "full"], help="smollm2 memory part"
    )
    parser.add_argument("--ckpt-lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--loss-lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--profile-length", type=int, default=16384)
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument(
        "--longest-lengths", type=int, nargs="+", default=[32768, 65536, 131072], help="longest mode (tokens)"
    )
    parser.add_argument(
        "--longest-tiling",
        nargs="+",
        default=["none", "ours", "deepspeed"],
        choices=["none", "ours", "deepspeed"],
        help="longest mode: the MLP tiling of each cell",
    )
    parser.add_argument("--tile", type=int, default=8192, help="tokens per MLP tile (tiled MLP)")
    parser.add_argument(
        "--memprofile-methods", nargs="+", default=["longlora", "lora", "full"], help="memprofile mode"
    )
    parser.add_argument("--memprofile-length", type=int, default=8192, help="memprofile mode (SmolLM2)")
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
        args.longest_lengths, args.memprofile_length = [128, 256], 128
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
