"""A memory-lean forward for the RMSNorm copies LongLoRA trains.

A transformers RMSNorm (``LlamaRMSNorm`` and its copies) run through autograd keeps, for its backward, the fp32 copy
of its input and, once its weight is trained, the normalised input as well::

    x (B, T, C) bf16 --to fp32--> xf --* rsqrt(mean(xf^2) + eps)--> n --to bf16--> n16 --* w--> y
                       saved: xf (fp32, 2x the input)                  saved: n16 (for w's gradient)

For the final norm, which sits outside the checkpointed layers, those tensors live through the whole forward and
so sit at the step's peak: 3x its bf16 input (27 MiB for SmolLM2 at 8k tokens). :func:`use_lean_norms` gives each
trained RMSNorm copy a forward that computes exactly the same output (bit for bit: the same operations in the same
order) through one autograd function that saves only the input and ``rstd`` (one value per token) and recomputes
``n`` in the backward.

Three layouts of transformers' RMSNorms are known, and each copy's own forward is checked against them on a probe
before anything changes; a norm that matches none (a LayerNorm, a gated norm, another formula) keeps its forward:

- ``llama``: ``w * n.to(input_dtype)`` (Llama, Mistral, Qwen2/3, Phi-3, Granite, DeepSeek-V3, ...);
- ``weight_first``: ``(w * n).to(input_dtype)`` (OLMo-2);
- ``gemma``: ``(n * (1 + w.float())).to(input_dtype)`` (Gemma 1-3).

The gradients are the exact derivative computed in fp32 (the weight's gradient accumulated in fp32 over tokens);
they differ from autograd's only in rounding, and are no less accurate against an fp64 reference
(``tests/test_norms.py``).
"""

from __future__ import annotations

import types

import torch
from peft.utils.other import ModulesToSaveWrapper

from .precision import is_norm

LAYOUTS = ("llama", "weight_first", "gemma")
_EPS_ATTRIBUTES = ("variance_epsilon", "eps")


def _normalise(xf: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return xf * rstd, rstd  # (..., C), (..., 1)


def _scale(weight: torch.Tensor, layout: str) -> torch.Tensor:
    return 1.0 + weight.float() if layout == "gemma" else weight


def _combine(n: torch.Tensor, weight: torch.Tensor, input_dtype: torch.dtype, layout: str) -> torch.Tensor:
    """The norm's output from the normalised input ``n`` (fp32), as the layout's module computes it."""
    if layout == "llama":
        return weight * n.to(input_dtype)
    if layout == "weight_first":
        return (weight * n).to(input_dtype)
    return (n * _scale(weight, layout)).to(input_dtype)


class _LeanRMSNorm(torch.autograd.Function):
    """``_combine(normalise(x), weight)``, saving only ``x`` and ``rstd`` for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps, layout):
        # x (..., C) in the model's dtype; weight (C,)
        n, rstd = _normalise(x.to(torch.float32), eps)  # (..., C) fp32, (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        ctx.layout = layout
        return _combine(n, weight, x.dtype, layout)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        layout = ctx.layout
        n = x.to(torch.float32) * rstd  # (..., C) fp32, recomputed
        m = n.to(x.dtype).float() if layout == "llama" else n  # what the weight multiplied
        g = grad_out.float()  # (..., C)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g * m).reshape(-1, m.size(-1)).sum(0).to(weight.dtype)  # (C,)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g_n = g * _scale(weight, layout).float()  # d loss / d n, (..., C)
            # n = x * rstd, rstd = (mean(x^2) + eps)^-1/2  =>  dx = rstd * (g_n - n * mean(g_n * n))
            grad_x = (rstd * (g_n - n * (g_n * n).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None, None


def _eps_of(module: torch.nn.Module) -> float | None:
    for name in _EPS_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def lean_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The forward :func:`use_lean_norms` installs: the module's own output, through :class:`_LeanRMSNorm`."""
    return _LeanRMSNorm.apply(hidden_states, self.weight, self._longlora_norm_eps, self._longlora_norm_layout)


def matching_layout(module: torch.nn.Module, input_dtypes: tuple[torch.dtype, ...]) -> str | None:
    """The layout whose output equals ``module``'s own, bit for bit, for every dtype in ``input_dtypes``; else None.

    The probe is a small seeded input (the global RNG is not touched) and runs without autograd.
    """
    weight = getattr(module, "weight", None)
    eps = _eps_of(module)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or eps is None:
        return None
    if weight.device.type == "meta" or weight.numel() == 0:  # not materialised (meta, ZeRO-3 partition)
        return None
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn((2, 3, weight.numel()), generator=generator).to(weight.device)  # (2, 3, C)
    with torch.no_grad():
        for layout in LAYOUTS:
            try:
                if all(
                    torch.equal(
                        module.forward(probe.to(dtype)),
                        _combine(_normalise(probe.to(dtype).float(), eps)[0], weight, dtype, layout),
                    )
                    for dtype in input_dtypes
                ):
                    return layout
            except (RuntimeError, TypeError):
                return None
    return None


def use_lean_norms(model: torch.nn.Module, adapter_name: str = "default") -> list[str]:
    """Give every trained RMSNorm copy (``modules_to_save`` of ``adapter_name``) the memory-lean forward.

    Call it after :func:`hf_longlora.adapters.precision.upcast_trained_copies`: the probe checks the copy as it
    will run (its weight's dtype, inputs in the base's dtype). Calling it again changes nothing.

    Returns:
        The names of the wrapped modules whose copies got the lean forward.
    """
    changed = []
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or adapter_name not in wrapper.modules_to_save:
            continue
        trained = wrapper.modules_to_save[adapter_name]
        if not is_norm(trained) or getattr(trained, "_longlora_norm_layout", None) is not None:
            continue
        weight = getattr(trained, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        compute_dtype = getattr(trained, "_longlora_compute_dtype", None) or weight.dtype
        # bf16 always: in fp32 alone the llama and weight_first layouts agree, they round differently in bf16
        layout = matching_layout(
            trained, tuple(dict.fromkeys((compute_dtype, torch.float32, torch.bfloat16)))
        )
        if layout is None:
            continue
        trained._longlora_norm_eps = _eps_of(trained)
        trained._longlora_norm_layout = layout
        trained.forward = types.MethodType(lean_forward, trained)
        changed.append(name)
    return changed
