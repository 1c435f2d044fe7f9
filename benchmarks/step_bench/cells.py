"""One benchmark cell = one training step of one method at one length, in a fresh subprocess (its own peak RSS).

``worker`` runs in the subprocess (``train_step.py --worker JSON``); ``Runner`` starts cells, reuses measured ones
(``--load`` / ``--reuse``) and keeps the results; ``best`` picks a cell's best step. The modes (speed.py, memory.py,
smollm2.py, loss.py, profiling.py) only choose cells and print tables.

Precision (``dtype``): ``fp32``; ``bf16`` (the model cast to bf16, no autocast: full fine-tuning is pure bf16, its
weights, gradients and AdamW state all bf16; the adapters' trained parameters keep the fp32 master weights that
PEFT (LoRA matrices) and hf_longlora (trained embedding and norm copies) give them on a bf16 model);
``bf16-mixed`` (what ``TrainingArguments(bf16=True)`` does: fp32 weights and optimizer state, the forward under
``torch.autocast(bfloat16)``); and ``bf16-base`` (what PEFT users run: ``from_pretrained(dtype=torch.bfloat16)`` plus
``TrainingArguments(bf16=True)``: the frozen weights in bf16, fp32 master weights, gradients and AdamW state for
the trained parameters only (PEFT upcasts the LoRA matrices, hf_longlora the trained embedding and norm copies),
the forward under autocast. Full fine-tuning trains every weight, so its ``bf16-base`` cell is its ``bf16-mixed``
one: an fp32 model).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
DTYPES = ("fp32", "bf16", "bf16-mixed", "bf16-base")
AUTOCAST_DTYPES = ("bf16-mixed", "bf16-base")
TRAIN_STEP_SCRIPT = Path(__file__).resolve().parent.parent / "train_step.py"


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

    # bf16-mixed keeps fp32 weights (and so fp32 gradients and AdamW state); the worker autocasts the forward.
    # bf16-base loads bf16: the adapters' trained parameters get fp32 master weights, full FT stays an fp32 model
    method = cfg["method"]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "bf16-mixed": torch.float32}.get(
        cfg["dtype"], torch.float32 if method == "full" else torch.bfloat16
    )
    attn = cfg.get("attn") or (hf_longlora.S2_ATTENTION if method == "longlora" else "sdpa")
    torch.manual_seed(0)
    if cfg["model"] == "smollm2":
        from transformers import AutoConfig

        from hf_longlora.adapters.smollm2 import smollm2_checkpoint

        config = AutoConfig.from_pretrained(smollm2_checkpoint())
        if cfg["length"] > config.max_position_embeddings:
            extend_context(config, cfg["length"])  # position interpolation beyond its 8k, as LongLoRA trains
        model = AutoModelForCausalLM.from_pretrained(
            smollm2_checkpoint(), config=config, dtype=dtype, attn_implementation=attn
        )
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
    if cfg.get("tiled_mlp"):
        from .tiling import tile_mlps

        tile_mlps(model, cfg["tiled_mlp"], cfg.get("tile") or 8192)
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

    from hf_longlora.training.loss import causal_lm_loss

    tracking = bool(cfg.get("track"))

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

    def phase(name: str):  # labels for the tensor-level tracker (tracker.py); free otherwise
        return torch.profiler.record_function("phase::" + name) if tracking else contextlib.nullcontext()

    def step(length: int) -> float:
        ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
        batch = {"input_ids": ids, "labels": ids}
        cpu_start = time.process_time()
        start = time.perf_counter()
        with (
            phase("forward"),
            torch.autocast(device, dtype=torch.bfloat16, enabled=cfg["dtype"] in AUTOCAST_DTYPES),
        ):
            if cfg["loss"] in (
                "chunked",
                "checkpointed",
            ):  # fused where the head allows it / always recompute
                fused = None if cfg["loss"] == "chunked" else False
                with torch.profiler.record_function("mod::loss") if tracking else contextlib.nullcontext():
                    loss = causal_lm_loss(model, batch, chunk_size=cfg["chunk"], fused=fused)
            else:
                loss = model(**batch, use_cache=False).loss
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
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
    if tracking:
        from torch.profiler import ProfilerActivity, profile

        from .tracker import label_modules, live_at_peak

        with label_modules(model), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            times = [step(cfg["length"])]
        tracked = live_at_peak(prof)
        del prof
    elif cfg.get("profile"):
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
        tracked=tracked if tracking else None,
        **sizes,
    )
    return result


# ---------------------------------------------------------------------------------------------- the driver


KEYS = ("model", "method", "length", "dtype", "ckpt", "loss", "group", "tiled_mlp", "tile", "track")


_CELL_LINE = re.compile(
    r"#\s+(?P<model>\w+) (?P<method>\w+)\s+L=\s*(?P<length>\d+) (?P<dtype>[\w-]+) ckpt=(?P<ckpt>\d) "
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
            done = [r for r in self.results if all(r.get(k) == base.get(k) for k in KEYS)]
            if done:
                return done[0]
        if a.tables_only:
            return None
        if a.quick:  # the smoke run: in this process (peak RSS is then the process's, not the cell's)
            result = worker(base)
            result["wall"] = 0.0
            self.results.append(result)
            self._save(result)
            return result
        cmd = [sys.executable, str(TRAIN_STEP_SCRIPT), "--worker", json.dumps(base)]
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
        self._save(result)
        if a.verbose:
            print(
                f"#   {result['model']} {result['method']:<13} L={result['length']:>6} {result['dtype']} "
                f"ckpt={int(result['ckpt'])} loss={result['loss']} group={result['group']}: "
                f"step {min(result['times']):.2f} s, peak {result['peak'] / GIB:.3f} GiB (wall {wall:.0f} s, "
                f"cpu {min(result['cpu_times']):.1f} s)",
                flush=True,
            )
        return result

    def _save(self, result: dict) -> None:
        if self.args.save:
            with open(self.args.save, "a") as f:
                f.write(json.dumps(result) + "\n")


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
