"""Probe every causal-LM model type of the installed transformers with ``attn_implementation="s2_attention"``.

For each type it builds a tiny model from the type's own default config (shrunk: 2 layers, 64 wide, 4 heads over
2 KV heads, small experts, the layer-type mix kept), in fp64, and checks:

1. **load**: the model builds, or is refused with a message (recorded verbatim);
2. **train parity**: in training mode, every attention call S2-Attn makes is compared, on the very same q/k/v, with
   the dense fp64 reference of the test suite (``tests/reference.py``: the S2 pattern of each document, ANDed with
   the model's own mask, e.g. a sliding window or attention chunks; soft-capping and sinks as the model passes them);
3. **backward**: the training loss and every parameter gradient equal those of the same weights run with the
   reference as the attention function (no S2 code involved), and are finite;
4. **eval**: in evaluation mode, logits (plain and left-padded) equal the model's own ``eager`` attention on the
   same weights;
5. **padding**: in training mode, rows of a right- and a left-padded batch equal each row run alone.

It writes ``docs/models.md`` (the table, every refusal's exact message, every failure's error). Run it with::

    .venv/bin/python tools/probe_models.py               # all types, writes docs/models.md (about 10 min, 2 cores)
    .venv/bin/python tools/probe_models.py --only llama gpt_oss bloom --out /tmp/models.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402
from reference import reference_attention  # noqa: E402  (the test suite's independent dense reference)
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

import hf_longlora  # noqa: E402,F401  (registers s2_attention)
from hf_longlora.attention import backend  # noqa: E402

LENGTH = 48  # tokens per row: 6 S2 groups of 8
GROUP = 8
SHORT = 37  # the shorter row of the padded batches (not a multiple of the group)
# largest relative error accepted per check, fp64 (a real bug, a shifted group off by one, gives 1e-1 or more).
# "eval (own)" compares with the model's eager attention, whose softmax is fp32 even for fp64 inputs; "padding"
# compares different batch shapes, and some models compute parts in fp32 whose kernels depend on the shape.
TOLERANCES = {
    "train": 1e-9, "loss": 1e-9, "backward": 1e-8, "backward (fp32 params)": 1e-5, "eval": 1e-6, "eval (own)": 1e-6,
    "padding": 1e-6,
}  # fmt: skip
TIME_LIMIT_S = 120  # per model type

# config fields shrunk when the type's config has them (only ever set when present)
SIZES = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "n_embed": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "multi_query_group_num": 2, "num_kv_heads": 2, "n_kv_heads": 2,
    "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16, "rotary_dim": 8,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128, "inner_hidden_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "top_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "vocab_size": 256, "max_position_embeddings": 512, "n_positions": 512, "seq_length": 512,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "sliding_window": 24, "attention_chunk_size": 24, "sliding_window_size": 24,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
}  # fmt: skip
SET_IF_NONE = ("head_dim", "num_key_value_heads")  # None in some defaults (hunyuan, ministral), read as ints
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")

# the suite tests these families for each attention feature; the table marks them
FEATURE_FIELDS = {
    "sliding window": ("sliding_window", "sliding_window_size"),
    "chunked attention": ("attention_chunk_size",),
    "softcap": ("attn_logit_softcapping",),
    "MLA": ("kv_lora_rank",),
    "MoE": ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
}


class ProbeTimeout(Exception):
    pass


@dataclasses.dataclass
class Result:
    model_type: str
    class_name: str
    status: str = "exact"  # exact | refused | mismatch | no attention | probe failed
    detail: str = ""
    features: list[str] = dataclasses.field(default_factory=list)
    errors: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------- tiny configs


def _layer_indices(config, layers: int) -> list[int]:
    """Which of the default config's layers to keep: layer 0 and the first of another layer type, so that
    hybrid models keep one layer of each kind (gemma3: sliding and full)."""
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and types:
        keep = [0]
        for i, kind in enumerate(types):
            if len(keep) < layers and kind not in [types[k] for k in keep]:
                keep.append(i)
        return (keep + [i for i in range(len(types)) if i not in keep])[:layers]
    return list(range(layers))


def _is_layer_index_list(key: str, value) -> bool:
    return (
        key.endswith(("_layers", "_idxs", "_indices"))
        and isinstance(value, list)
        and bool(value)
        and all(isinstance(i, int) for i in value)
    )


def shrink(config):
    """A tiny copy of ``config`` (its type's default), recursively for sub-configs (text, vision, ...)."""
    values = config.to_dict()
    overrides = {
        k: v for k, v in SIZES.items() if k in values and (values[k] is not None or k in SET_IF_NONE)
    }
    if isinstance(values.get("sliding_window"), bool):
        overrides.pop("sliding_window", None)
    old_layers = next(
        (values[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if isinstance(values.get(k), int)),
        None,
    )  # fmt: skip
    if old_layers:
        new_layers = min(old_layers, 2)
        keep = _layer_indices(config, new_layers)
        for (
            key,
            value,
        ) in values.items():  # per-layer lists: layer_types, no_rope_layers, mlp_only_layers, ...
            if isinstance(value, list) and len(value) == old_layers and old_layers > new_layers:
                overrides[key] = [value[i] for i in keep]
            elif _is_layer_index_list(key, value) and max(value) >= new_layers:  # mlp_only_layers=[3, 7]
                overrides[key] = [i for i in value if i < new_layers] or [new_layers - 1]
    if "kv_lora_rank" in overrides:  # MLA: keys have every head, and the rotary dim is head_dim
        if "num_key_value_heads" in values:
            overrides["num_key_value_heads"] = overrides["num_attention_heads"]
        if "head_dim" in values:
            overrides["head_dim"] = overrides.get("qk_rope_head_dim", overrides["head_dim"])
    for key in TOKEN_FIELDS:
        if isinstance(values.get(key), int) and values[key] >= 256:
            overrides[key] = {"pad_token_id": 0, "bos_token_id": 1}.get(key, 2)
    for key, value in values.items():  # deterministic training mode: no dropout, no router noise
        if isinstance(value, float) and ("dropout" in key or "jitter" in key or key.endswith("_pdrop")):
            overrides[key] = 0.0
    for key, value in values.items():
        sub = getattr(config, key, None)
        if isinstance(value, dict) and isinstance(sub, transformers.PretrainedConfig):
            overrides[key] = shrink(sub)
    for _ in range(len(overrides)):  # the rest: the type's defaults, derived for the new sizes
        try:
            tiny = type(config)(**overrides)
            break
        except Exception as error:  # a per-layer attribute (gemma4's head_dim) is not set globally: leave it
            key = next((k for k in overrides if f"'{k}' is a per-layer attribute" in str(error)), None)
            if key is None:
                raise
            overrides.pop(key)
    tiny.s2_group_size = GROUP
    return tiny


# ------------------------------------------------------------------------------------------- reference backend

# the documents of the batch being run: per row, the list of each document's positions
CURRENT = {"documents": None, "calls": [], "kwargs_seen": set()}


def _reference_call(module, query, key, value, attention_mask, *, training: bool, **kwargs):
    extra = bias = None
    if attention_mask is not None:
        attention_mask = attention_mask[..., : query.shape[2], : key.shape[2]]
        if attention_mask.dtype == torch.bool:
            extra = attention_mask
        else:  # an additive mask (doge's is learned): added to the scores, its masked entries excluded
            extra = attention_mask > torch.finfo(attention_mask.dtype).min / 2
            bias = attention_mask.masked_fill(~extra, 0.0)
    sinks = next((kwargs[n] for n in ("s_aux", "sinks") if kwargs.get(n) is not None), None)
    return reference_attention(
        query, key, value, CURRENT["documents"], group_size=module.config.s2_group_size, scale=kwargs.get("scaling"),
        full=not training, softcap=kwargs.get("softcap"), sinks=sinks, extra_mask=extra, bias=bias,
    )  # fmt: skip


def reference_backend(module, query, key, value, attention_mask, **kwargs):
    """The dense fp64 S2 reference as an attention function (training mode), for the backward check."""
    if query.shape[2] != key.shape[2]:  # extra keys (deepseek_v4's compressed ones): S2 does not apply there
        return backend.model_eager_attention(module, query, key, value, attention_mask, **kwargs)
    out = _reference_call(module, query, key, value, attention_mask, training=module.training, **kwargs)
    return out.contiguous(), None  # (B, L, H, Dv): models .view() it


def checking_s2(module, query, key, value, attention_mask, **kwargs):
    """S2-Attn, with each training-mode call compared against the reference on the same inputs."""
    out, weights = backend.s2_attention_forward(module, query, key, value, attention_mask, **kwargs)
    CURRENT["kwargs_seen"].update(k for k, v in kwargs.items() if v is not None)
    causal = (
        kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)
    )
    if module.training and query.shape[2] != key.shape[2]:
        CURRENT["kwargs_seen"].add("keys differ from queries")
    if module.training and query.shape[2] == key.shape[2] > 1 and causal:
        with torch.no_grad():
            ref = _reference_call(module, query, key, value, attention_mask, training=True, **kwargs)
        CURRENT["calls"].append(
            {
                "error": _relative(out.detach(), ref),
                "heads": (query.shape[1], key.shape[1]),
                "dims": (query.shape[-1], value.shape[-1]),
                "mask": None if attention_mask is None else str(attention_mask.dtype).removeprefix("torch."),
            }
        )
    return out, weights


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected.double()).abs().max().item() / scale


AttentionInterface.register("probe_s2", checking_s2)
AttentionMaskInterface.register("probe_s2", sdpa_mask)
AttentionInterface.register("probe_reference", reference_backend)
AttentionMaskInterface.register("probe_reference", sdpa_mask)


# ------------------------------------------------------------------------------------------- the checks


def _documents(lengths: list[int], side: str, total: int) -> list[list[list[int]]]:
    return [[list(range(total - n, total)) if side == "left" else list(range(n))] for n in lengths]


def _padded(ids: torch.Tensor, lengths: list[int], side: str):
    """(input_ids, attention_mask, position_ids) for rows of ``lengths`` real tokens padded on ``side``."""
    batch, total = len(lengths), ids.shape[1]
    mask = torch.zeros(batch, total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, total - n :] = 1
        else:
            mask[row, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids * mask, mask, positions


def _run(model, ids, mask=None, positions=None, documents=None, labels=None):
    CURRENT["documents"] = documents or [[list(range(ids.shape[1]))] for _ in range(ids.shape[0])]
    kwargs = {"input_ids": ids, "use_cache": False}
    if mask is not None:
        kwargs.update(attention_mask=mask, position_ids=positions)
    if labels is not None:
        kwargs["labels"] = labels
    return model(**kwargs)


def _features(config, model, calls, kwargs_seen) -> list[str]:
    text = getattr(config, "get_text_config", lambda: config)()
    found = []
    heads = {c["heads"] for c in calls}
    if any(h != kv for h, kv in heads):
        found.append("GQA " + ",".join(f"{h}/{kv}" for h, kv in sorted(heads)))
    if any(d != dv for d, dv in {c["dims"] for c in calls}):
        found.append("value dim differs")
    for name, fields in FEATURE_FIELDS.items():
        if any(getattr(text, f, None) not in (None, 0, False) for f in fields):
            found.append(name)
    types = set(getattr(text, "layer_types", None) or [])
    if len(types) > 1:
        found.append("hybrid layers (" + ", ".join(sorted(types)) + ")")
    rope = getattr(text, "rope_parameters", None) or {}
    partial = getattr(text, "partial_rotary_factor", None) or (
        rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    )
    if partial is not None and partial < 1:
        found.append("partial rotary")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if names & {"q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm"}:
        found.append("qk-norm")
    if kwargs_seen & {"s_aux", "sinks"}:
        found.append("sinks")
    if "softcap" in kwargs_seen and "softcap" not in found:
        found.append("softcap")
    if "keys differ from queries" in kwargs_seen:
        found.append("extra keys in some layers (full attention there)")
    return found


def _gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_error(actual: dict, expected: dict, dtype: torch.dtype) -> float:
    """Largest relative error over the parameters of ``dtype``. A gradient that is zero in exact arithmetic (a key
    bias: softmax ignores it) is rounding noise, so each parameter's scale is at least 1e-9 of the largest one."""
    if actual.keys() != expected.keys():
        return math.inf
    floor = 1e-9 * max(g.abs().max().item() for g in expected.values())
    worst = 0.0
    for name, grad in expected.items():
        if not torch.isfinite(actual[name]).all():
            return math.inf
        if grad.dtype == dtype:
            scale = max(grad.abs().max().item(), floor) or 1.0
            worst = max(worst, (actual[name] - grad).abs().max().item() / scale)
    return worst


def _describe(error: Exception) -> str:
    last = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__} at {Path(last.filename).name}:{last.lineno}: {error}"[:400]


def _fails_without_s2(config, ids) -> str | None:
    """The error the model raises on the probe's inputs with its own eager attention (no S2 anywhere), if any."""
    try:
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float64
        )
        for training in (True, False):
            model.train(training)
            for side in ("right", "left"):
                batch = _padded(ids, [LENGTH, SHORT], side)
                model(
                    input_ids=batch[0],
                    attention_mask=batch[1],
                    position_ids=batch[2],
                    labels=ids,
                    use_cache=False,
                )
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    except Exception as error:  # noqa: BLE001
        return _describe(error)
    return None


def probe(model_type: str, overrides: dict | None = None) -> Result:
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    result = Result(model_type, class_name)
    cls = getattr(transformers, class_name, None)
    if cls is None:
        result.status, result.detail = "probe failed", f"transformers has no class {class_name}"
        return result
    try:
        backend.check_model_supports_s2(cls, model_type)
    except ValueError as error:
        result.status, result.detail = "refused", str(error)
        return result
    torch.manual_seed(0)
    try:
        config = shrink(AutoConfig.for_model(model_type))
        for key, value in (overrides or {}).items():
            setattr(config, key, value)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="probe_s2", experts_implementation="eager", dtype=torch.float64
        )  # eager experts: grouped_mm has no fp64
    except Exception as error:  # noqa: BLE001  (recorded in the table)
        result.status, result.detail = (
            "probe failed",
            f"tiny model not built: {type(error).__name__}: {error}",
        )
        return result
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, 256), (2, LENGTH), generator=generator)
    CURRENT["calls"], CURRENT["kwargs_seen"] = [], set()
    try:
        # train parity, call by call; backward against the reference backend on the same weights
        model.train()
        out = _run(model, ids, labels=ids)
        if not CURRENT["calls"]:
            result.status = "no attention"
            result.detail = "no causal self-attention call reached the attention interface in training"
            return result
        result.errors["train"] = max(c["error"] for c in CURRENT["calls"])
        result.features = _features(config, model, CURRENT["calls"], CURRENT["kwargs_seen"])
        out.loss.backward()
        s2_loss, s2_grads = out.loss.detach(), _gradients(model)
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation("probe_reference")
        ref = _run(model, ids, labels=ids)
        ref.loss.backward()
        result.errors["loss"] = _relative(s2_loss, ref.loss.detach())
        ref_grads = _gradients(model)
        result.errors["backward"] = _grad_error(s2_grads, ref_grads, torch.float64)
        if any(
            g.dtype == torch.float32 for g in ref_grads.values()
        ):  # kept in fp32 by the model (gpt-oss sinks)
            result.errors["backward (fp32 params)"] = _grad_error(s2_grads, ref_grads, torch.float32)
        model.zero_grad(set_to_none=True)

        # eval, plain and left-padded: the fp64 reference (full causal attention), and the model's own eager
        # attention on the same weights
        model.eval()
        padded = _padded(ids, [LENGTH, SHORT], "left")
        keep = padded[1].bool()
        left_documents = _documents([LENGTH, SHORT], "left", LENGTH)

        def logits_with(implementation):
            model.set_attn_implementation(implementation)
            return _run(model, ids).logits, _run(model, *padded, documents=left_documents).logits

        with torch.no_grad():
            ours, reference, own = (logits_with(i) for i in ("probe_s2", "probe_reference", "eager"))
        for name, theirs in (("eval", reference), ("eval (own)", own)):
            result.errors[name] = max(
                _relative(ours[0], theirs[0]), _relative(ours[1][keep], theirs[1][keep])
            )

        # padding invariance in training: each padded row equals the row alone
        model.set_attn_implementation("probe_s2")
        model.train()
        worst = 0.0
        with torch.no_grad():
            for side in ("right", "left"):
                batch = _padded(ids, [LENGTH, SHORT], side)
                logits = _run(model, *batch, documents=_documents([LENGTH, SHORT], side, LENGTH)).logits
                for row, n in enumerate([LENGTH, SHORT]):
                    real = slice(LENGTH - n, LENGTH) if side == "left" else slice(0, n)
                    alone = _run(model, batch[0][row : row + 1, real]).logits[0]
                    worst = max(worst, _relative(logits[row, real], alone))
        result.errors["padding"] = worst
    except ProbeTimeout:
        raise
    except Exception as error:  # noqa: BLE001  (recorded in the table)
        result.status, result.detail = "probe failed", _describe(error)
        own = _fails_without_s2(config, ids)
        if own is not None:
            result.status = "fails without S2"
            result.detail = f"the same inputs fail with attn_implementation='eager' too: {own}"
        return result
    bad = [name for name, value in result.errors.items() if not value <= TOLERANCES[name]]
    if bad:
        result.status = "mismatch"
        result.detail = "; ".join(f"{name} {result.errors[name]:.1e}" for name in bad)
    return result


@contextlib.contextmanager
def _time_limit(seconds: int):
    def stop(signum, frame):
        raise ProbeTimeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------- the report

INTRO = """# Model families

S2-Attn runs inside any causal LM whose attention goes through transformers' `AttentionInterface` (its class has
`_supports_attention_backend = True`). Models that compute attention in their own code are refused at load, with
the message below. This page is written by `tools/probe_models.py`; the table is the one it produced.

## How each model type was checked

Every causal-LM type of the installed transformers (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`) is built from its own
default config shrunk to a tiny model (2 layers, hidden size 64, 4 query / 2 KV heads, 4 small experts, one layer of
each layer type), in fp64, with S2 groups of {group} over rows of {length} tokens, and:

- **train**: every training-mode attention call, on the very same q/k/v, against the test suite's dense fp64
  reference (`tests/reference.py`: the S2 pattern of each document ANDed with the model's own mask, soft-capping and
  sinks as the model passes them);
- **loss / backward**: the training loss and every parameter gradient against the same weights run with that
  reference as the attention function (no S2 code involved); parameters a model keeps in fp32 (sinks) are shown
  apart, at fp32's tolerance (1e-5);
- **eval**: evaluation-mode logits, plain and left-padded, against the same reference in full causal attention, and
  (**eval (own)**) against the model's own `eager` attention on the same weights;
- **padding**: training-mode rows of a right- and a left-padded batch ({length} and {short} tokens) against each row
  run alone.

Each number is the largest relative error (max |ours - reference| / max |reference|); "exact" means each is within
fp64 rounding: at most 1e-9 (train, loss), 1e-8 (backward), and 1e-6 for **eval** and **eval (own)**, since the
models' eager attention (which S2-Attn's evaluation uses for models with sinks or soft-capping) takes the softmax in
fp32 even for fp64 inputs, and for **padding**, which compares different batch shapes (some models compute parts
in fp32, with shape-dependent kernels). A real bug, such as a shifted group off by one, gives 1e-1 or more.

The probe's sliding windows and attention chunks are {window} tokens, wider than the S2 groups (the fast path); the
suite runs one model per attention feature through the same checks, including a window narrower than the groups
(the dense path), 9 query / 3 KV heads and MLA with a value dim unlike the q/k dim: `tests/test_model_families.py`.

## Notes

- **Refused, no AttentionInterface**: the class declares `_supports_attention_backend = False` (transformers' own
  flag), so its attention never reaches S2-Attn and the mask it would get is not the one it expects.
- **Refused, float mask only** (deepseek_v4): the model appends its compressed-key bias to the mask with
  `block_bias.to(attention_mask.dtype)`, which inverts it for a boolean mask; its class says `_supports_sdpa = False`,
  and only `eager` is right for it.
- **position_bias** (inkling2_text, inkling2_loop_text): refused by transformers' flag. With the flag forced on, the
  evaluation path is exact (it routes `position_bias`, sinks and soft-capping to the model's own eager attention:
  logits equal, 0.0), and training raises "s2_attention does not support `position_bias`". The 4.5e-2 evaluation
  error seen before was ours: evaluation called transformers' `sdpa`, which dropped the model's sinks.
- **No attention**: no causal self-attention call reached the attention interface in training (encoder models with a
  causal-LM head and `is_decoder=False`, recurrent models).
- **Not probed / fails without S2**: the probe's generic shrinking does not fit the type's config, or the model
  fails on the probe's inputs with its own eager attention; these say nothing about S2-Attn either way.
"""


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return "0" if value == 0 else f"{value:.0e}"


def _backward_cell(errors: dict) -> str:
    cell = _cell(errors.get("backward"))
    if "backward (fp32 params)" in errors:
        cell += f" (fp32 params: {_cell(errors['backward (fp32 params)'])})"
    return cell


def write_report(results: list[Result], path: Path, seconds: float, argv: list[str]) -> None:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [
        INTRO.format(group=GROUP, length=LENGTH, short=SHORT, window=SIZES["sliding_window"]),
        f"Produced by `python tools/probe_models.py{(' ' + ' '.join(argv)) if argv else ''}` with transformers "
        f"{transformers.__version__}, torch {torch.__version__}, on {platform.machine()} "
        f"({torch.backends.cpu.get_cpu_capability()}), in {seconds / 60:.1f} min.",
        "",
        "**" + ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda x: -x[1])) + "** "
        f"(of {len(results)} model types).",
        "",
        "## The table",
        "",
        "| model type | class | result | attention features | train | loss | backward | eval | eval (own) | padding |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {
        "exact": 0,
        "mismatch": 1,
        "no attention": 2,
        "fails without S2": 3,
        "probe failed": 4,
        "refused": 5,
    }
    for r in sorted(results, key=lambda r: (order.get(r.status, 9), r.model_type)):
        e = r.errors
        lines.append(
            f"| {r.model_type} | {r.class_name} | {r.status} | {', '.join(r.features)} | {_cell(e.get('train'))} | "
            f"{_cell(e.get('loss'))} | {_backward_cell(e)} | {_cell(e.get('eval'))} | {_cell(e.get('eval (own)'))} | "
            f"{_cell(e.get('padding'))} |"
        )
    for status, title, note in (
        ("mismatch", "Mismatches", "checks above the tolerance"),
        ("no attention", "No attention layers", "S2-Attn does not apply"),
        (
            "fails without S2",
            "Fails without S2-Attn too",
            "the model fails on the probe's inputs with its own eager attention",
        ),
        (
            "probe failed",
            "Not probed",
            "the probe could not build or run a tiny model of the type; the error",
        ),
        ("refused", "Refused at load", "the exact message"),
    ):
        rows = [r for r in results if r.status == status]
        if not rows:
            continue
        lines += ["", f"## {title}", "", f"{note.capitalize()}:", ""]
        for r in sorted(rows, key=lambda r: r.model_type):
            lines.append(f"- **{r.model_type}** ({r.class_name}): {r.detail}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="MODEL_TYPE", help="probe only these model types")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "models.md", help="where to write the report"
    )
    args = parser.parse_args(argv)
    types = args.only or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    unknown = [t for t in types if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        parser.error(f"--only: not causal-LM model types of this transformers: {', '.join(unknown)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    results = []
    for model_type in types:
        began = time.perf_counter()
        try:
            with _time_limit(TIME_LIMIT_S):
                result = probe(model_type)
        except ProbeTimeout as error:
            result = Result(
                model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], "probe failed", str(error)
            )
        result.seconds = time.perf_counter() - began
        results.append(result)
        print(
            f"{model_type:32s} {result.status:13s} {result.seconds:5.1f}s {result.detail[:100]}", flush=True
        )
    write_report(results, args.out, time.perf_counter() - start, argv if argv is not None else sys.argv[1:])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
