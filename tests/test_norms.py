"""The memory-lean forward of the trained RMSNorm copies (hf_longlora/adapters/norms.py).

Forward: bit-identical to each family's own module. Gradients: against the same norm in fp64, at least as accurate
as autograd through the module's own forward (the flash-attention rule, with that forward as "PyTorch's own
error"). Memory: what autograd saves, counted with ``saved_tensors_hooks``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config
from transformers import LlamaForCausalLM
from transformers.models.cohere.modeling_cohere import CohereLayerNorm
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from hf_longlora import LongLoraConfig, get_longlora_model
from hf_longlora.adapters.norms import lean_forward, matching_layout, use_lean_norms

C = 96
FAMILIES = [
    (LlamaRMSNorm, "llama"),
    (Qwen3RMSNorm, "llama"),
    (Olmo2RMSNorm, "weight_first"),
    (GemmaRMSNorm, "gemma"),
]


def norm_of(cls, weight_dtype=torch.float32, seed=0):
    norm = cls(C, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.empty(C).uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed)))
    return norm.to(weight_dtype)


def lean_copy(norm, layout):
    lean = copy.deepcopy(norm)
    lean._longlora_norm_eps = 1e-6
    lean._longlora_norm_layout = layout
    lean.forward = lean_forward.__get__(lean)
    return lean


def inputs(dtype, seed=1):
    x = torch.randn(3, 40, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 0.5
    return x.to(dtype)


def grads(norm, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    norm.zero_grad(set_to_none=True)
    out = norm(x)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad.double(), norm.weight.grad.double()


@pytest.mark.parametrize("cls,layout", FAMILIES, ids=[c.__name__ for c, _ in FAMILIES])
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lean_norm_matches_the_family_forward_bitwise_and_its_gradients_are_as_accurate(
    cls, layout, input_dtype
):
    norm = norm_of(cls)  # an fp32 master weight, as upcast_trained_copies leaves it
    assert (
        matching_layout(norm, (input_dtype, torch.bfloat16)) == layout
    )  # bf16 tells llama from weight_first
    lean = lean_copy(norm, layout)
    x = inputs(input_dtype)
    # the upstream gradient in the output's dtype for all three, so that its rounding is no part of the error
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad_out = grad_out.to(norm(x).dtype).double()
    out_own, gx_own, gw_own = grads(norm, x, grad_out)
    out_lean, gx_lean, gw_lean = grads(lean, x, grad_out)
    assert out_lean.dtype == out_own.dtype and torch.equal(out_lean, out_own)

    reference = copy.deepcopy(norm).double()
    _, gx_ref, gw_ref = grads(reference, x.double(), grad_out)
    for lean_grad, own_grad, ref in ((gx_lean, gx_own, gx_ref), (gw_lean, gw_own, gw_ref)):
        own_error = (own_grad - ref).abs().max().item()
        lean_error = (lean_grad - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert lean_error <= 2 * own_error + 1e-6 * scale, (lean_error, own_error, scale)


def saved_bytes(module, x) -> int:
    """Bytes of the non-parameter tensors autograd saves for ``module(x)``'s backward (unique storages)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_(True))
    return sum(seen.values())


def test_lean_norm_saves_the_input_and_one_value_per_token():
    norm = norm_of(LlamaRMSNorm)
    x = inputs(torch.bfloat16)  # (3, 40, C)
    input_bytes = x.numel() * x.element_size()
    lean = saved_bytes(lean_copy(norm, "llama"), x)
    own = saved_bytes(norm, x)
    # the bf16 input and fp32 rstd (one per token)
    assert lean == input_bytes + 3 * 40 * 4, lean
    # the module's own forward: the fp32 copy (2x the input), rstd, the bf16 normalised input (1x)
    assert own >= 3 * input_bytes, own


@pytest.mark.parametrize(
    "module",
    [torch.nn.LayerNorm(C), CohereLayerNorm(C), torch.nn.Linear(C, C)],
    ids=["LayerNorm", "CohereLayerNorm", "Linear"],
)
def test_modules_no_layout_reproduces_keep_their_forward(module):
    assert matching_layout(module, (torch.bfloat16, torch.float32)) is None


def test_a_near_miss_formula_is_rejected_by_the_probe():
    class OffsetRMSNorm(
        LlamaRMSNorm
    ):  # Llama's layout with the weight offset by 1 in bf16: no layout matches
        def forward(self, hidden_states):
            return super().forward(hidden_states) + hidden_states

    assert matching_layout(norm_of(OffsetRMSNorm), (torch.bfloat16,)) is None


def bf16_model(seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(attn_implementation="sdpa"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.to(torch.bfloat16).train()


def test_get_longlora_model_gives_every_trained_norm_the_lean_forward_and_keeps_loss_and_gradients():
    model = get_longlora_model(bf16_model(), LongLoraConfig())
    norms = [
        m for n, m in model.named_modules() if n.endswith("modules_to_save.default") and "norm" in n.lower()
    ]
    assert norms and all(getattr(m, "_longlora_norm_layout", None) == "llama" for m in norms)
    own = copy.deepcopy(model)
    for module in own.modules():
        if "forward" in vars(module):
            del module.forward  # back to LlamaRMSNorm.forward
    assert not any("forward" in vars(m) for m in own.modules())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for m in (model, own):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad})
        )
    (loss_lean, g_lean), (loss_own, g_own) = results
    assert torch.equal(loss_lean, loss_own)  # bit-identical forward
    assert g_lean.keys() == g_own.keys()
    for name in g_lean:
        scale = g_own[name].abs().max().item()
        assert (g_lean[name] - g_own[name]).abs().max().item() <= 0.02 * scale + 1e-6, name


def test_use_lean_norms_is_idempotent_and_leaves_the_global_rng_alone():
    model = get_longlora_model(bf16_model(), LongLoraConfig())
    state = torch.random.get_rng_state()
    assert use_lean_norms(model) == []  # done by get_longlora_model already
    assert torch.equal(torch.random.get_rng_state(), state)
    fresh = bf16_model()
    from peft import get_peft_model

    peft_model = get_peft_model(fresh, LongLoraConfig())
    state = torch.random.get_rng_state()
    changed = use_lean_norms(peft_model)
    assert len(changed) == 2 * fresh.config.num_hidden_layers + 1  # two per layer and the final norm
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_norm_on_the_meta_device_is_not_probed():
    with torch.device("meta"):
        norm = LlamaRMSNorm(C)
    assert matching_layout(norm, (torch.float32,)) is None
