"""A tensor-level memory tracker for one training step: what is live at the step's peak, by tensor class.

It reads the CPU allocator's own events (``torch.profiler`` with ``profile_memory=True``: every allocation and
free with its address and size, inside the op that made it), so it counts exactly the bytes torch allocated
during the step, not RSS. Every module's ``forward`` is wrapped in a ``record_function("mod::<name>")`` (balanced
even when checkpointing stops a recompute early), and the three phases in ``phase::forward`` /
``phase::backward`` / ``phase::optimizer``, so each allocation gets:

- its phase; in the backward, whether it came from a checkpoint recompute (a module label under a backward node)
  or from a backward node, and which forward module that node belongs to (matched by autograd sequence number);
- its module (layer indices folded: ``layers.*.self_attn.q_proj.lora_A``) and the aten op that allocated it.

``classify`` maps that to the classes of the issue (checkpointed layer inputs, LoRA intermediates, the attention
kernel and the S2 output assembly, the embedding gradient, the loss chunks, ...). Memory that existed before the
step (weights, optimizer state, the process) is not in the profile: the cell reports it from the tensors' sizes.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import defaultdict

_LAYER = re.compile(r"\.(\d+)(?=\.|$)")


def _short(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return _LAYER.sub(".*", name) or "model"


@contextlib.contextmanager
def label_modules(model):
    """Wrap every module's forward in ``record_function("mod::<name>")`` for the duration."""
    import torch

    wrapped = []
    for name, module in model.named_modules():
        original = module.forward
        label = "mod::" + _short(name)

        @functools.wraps(original)
        def forward(*args, __original=original, __label=label, **kwargs):
            with torch.profiler.record_function(__label):
                return __original(*args, **kwargs)

        module.forward = forward
        wrapped.append(module)
    try:
        yield
    finally:
        for module in wrapped:
            del module.forward  # back to the class's forward


def classify(phase: str, module: str | None, node: str | None, node_module: str | None, op: str) -> str:
    """The tensor class of one allocation (see the module docstring)."""
    m = module or ""
    if phase == "forward":
        if m == "loss" and op in (
            "aten::empty_strided",
            "aten::empty",
            "aten::_to_copy",
            "aten::mm",
            "aten::addmm",
        ):
            return f"loss chunk ({op})"
        if m == "loss":
            return (
                "loss (fused): gradients kept for the backward"
                if op != "aten::_to_copy"
                else "loss: autocast copies"
            )
        if op in ("aten::_to_copy", "aten::to") and m.endswith(
            ("_proj", "lora_A.default", "lora_B.default", "base_layer")
        ):
            return "forward: autocast weight copies"
        if m.endswith("rotary_emb"):
            return "rotary cos/sin"
        if re.fullmatch(r"(model\.)?layers\.\*", m) or m.endswith("embed_tokens") or "embed_tokens" in m:
            return "checkpointed layer inputs (embedding and layer outputs)"
        if m.endswith("model.norm") or m == "norm" or m.endswith(".norm"):
            return "final norm (output, saved)"
        return f"forward, other ({m or op})"
    if phase == "optimizer":
        return "optimizer step temporaries"
    if phase != "backward":
        return f"{phase}"
    if module is not None and node is not None:  # a checkpoint recompute inside the backward
        return "recompute: " + _part(m, op)
    if node is None:
        return f"backward, outside nodes ({op})"
    if "Embedding" in node:
        return "embedding gradient (dense V x H)"
    if "FusedLinearCrossEntropy" in node:
        return "loss backward (gradient scaling)"
    if "AccumulateGrad" in node:
        return "parameter gradients (accumulated)"
    if "CheckpointFunction" in node:
        return "checkpoint"
    return "backward: " + _part(node_module or "", op)


def _part(m: str, op: str) -> str:
    if "lora_" in m:
        return "LoRA A/B"
    if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "base_layer")):
        return "attention projections"
    if m.endswith("self_attn"):
        if "scaled_dot_product" in op or "flash" in op:
            return "attention kernel (SDPA)"
        return f"attention: rotary, S2 split/assembly ({op})"
    if ".mlp" in m:
        return "MLP"
    if "layernorm" in m or m.endswith("norm"):
        return "norms"
    if re.fullmatch(r"(model\.)?layers\.\*", m):
        return "residual adds"
    if "embed" in m:
        return "embedding"
    return m or op


def live_at_peak(prof) -> dict:
    """Walk the profile's event tree: the peak of the step's allocated bytes and what is live then, by class."""
    from torch._C._profiler import _EventType

    events = []  # [time, ptr, size, (phase, module, backward node, op)]
    forward_module_of_seq: dict[int, str] = {}

    def visit(e, phase, module, node):
        kind = e.typed[0]
        if kind == _EventType.Allocation:
            f = e.typed[1]
            op = e.parent.name if e.parent is not None else "?"
            events.append([e.start_time_ns, f.ptr, f.alloc_size, (phase, module, node, op)])
            return
        name = e.name
        if name.startswith("phase::"):
            phase = name[len("phase::") :]
        elif name.startswith("mod::"):
            module = name[len("mod::") :]
        elif name.startswith("autograd::engine::evaluate_function: "):
            seq = e.typed[1].sequence_number if kind == _EventType.TorchOp else -1
            node = (name[len("autograd::engine::evaluate_function: ") :], seq)
            module = None  # a recompute inside this node sets it again
        elif kind == _EventType.TorchOp and phase == "forward" and module is not None:
            seq = e.typed[1].sequence_number
            if seq >= 0:
                forward_module_of_seq.setdefault(seq, module)
        for child in e.children:
            visit(child, phase, module, node)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        visit(root, "outside", None, None)
    events.sort(key=lambda x: x[0])
    total = peak = 0
    peak_index = -1
    for i, (_t, _ptr, size, _info) in enumerate(events):
        total += size
        if total > peak:
            peak, peak_index = total, i
    live: dict[int, tuple[int, tuple]] = {}
    freed_before = 0
    for _t, ptr, size, info in events[: peak_index + 1]:
        if size > 0:
            live[ptr] = (size, info)
        elif ptr in live:
            del live[ptr]
        else:
            freed_before += -size  # memory allocated before the step (e.g. last step's buffers)
    by_class: dict[str, int] = defaultdict(int)
    largest = []
    for size, (phase, module, node, op) in live.values():
        name, seq = node if node is not None else (None, -1)
        cls = classify(phase, module, name, forward_module_of_seq.get(seq), op)
        by_class[cls] += size
        largest.append((size, cls, phase, module, name, op))
    largest.sort(key=lambda x: -x[0])
    at = events[peak_index][3] if peak_index >= 0 else None
    return {
        "peak": peak,
        "freed_before": freed_before,
        "classes": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
        "largest": largest[:12],
        "peak_at": None
        if at is None
        else {"phase": at[0], "module": at[1], "node": at[2] and at[2][0], "op": at[3]},
    }
