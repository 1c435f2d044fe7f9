"""QLoRA on CPU for real: bitsandbytes NF4 with double quantisation and bf16 compute."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import tiny_config, train_steps
from transformers import AutoModelForCausalLM

from hf_longlora import extend_context, get_longlora_model, load_adapter, load_model, merge_and_save

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture
def saved_base(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("llama", hidden_size=128, intermediate_size=256, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_nf4_load_and_longlora_step(saved_base):
    full = load_model(str(saved_base), dtype=torch.bfloat16, attn_implementation="sdpa")
    model = load_model(str(saved_base), load_in_4bit=True, context_length=256, s2_group_size=32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.dtype == torch.uint8 and q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantisation
    assert q_proj.compute_dtype == torch.bfloat16
    assert weight_bytes(model) < 0.8 * weight_bytes(full)
    assert model.config.max_position_embeddings == 256 and model.config.s2_group_size == 32
    assert model.config._attn_implementation == "s2_attention"

    peft_model = get_longlora_model(model)
    peft_model.train()
    ids = torch.randint(0, 128, (1, 256))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
        assert all(g is not None and torch.isfinite(g).all() for g in lora_grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]


def test_merge_from_4bit_base(saved_base, tmp_path):
    model = load_model(str(saved_base), load_in_4bit=True, context_length=256)
    peft_model = get_longlora_model(model)
    ids = torch.randint(0, 128, (1, 128))
    train_steps(peft_model, ids, 2)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter_model = load_adapter(str(saved_base), str(tmp_path / "adapter"), load_in_4bit=True).eval()
    with torch.no_grad():
        want = adapter_model(ids).logits.float()
    out = merge_and_save(str(saved_base), str(tmp_path / "adapter"), str(tmp_path / "merged"), from_4bit=True)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["factor"] == 4.0
    with torch.no_grad():
        got = merged(ids).logits.float()
    # bf16 merge of the dequantised base: agreement to bf16 noise, far tighter than the logits' spread
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()  # measured: 0.6%


def test_load_in_4bit_without_bitsandbytes_names_the_extra(saved_base):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["bitsandbytes"] = None  # Python's marker for "not importable": find_spec returns None
        import hf_longlora
        try:
            hf_longlora.load_model({str(saved_base)!r}, load_in_4bit=True)
        except ImportError as exc:
            print("ERROR:", exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert "ERROR: load_in_4bit=True needs bitsandbytes: pip install 'hf-longlora[quant]'" in result.stdout, (
        result.stdout + result.stderr[-2000:]
    )


def test_bad_load_model_arguments_fail_before_loading(tmp_path):
    missing = str(tmp_path / "nowhere")  # would fail to load: the argument errors must come first
    with pytest.raises(ValueError, match="rope_method must be one of"):
        load_model(missing, context_length=1024, rope_method="ntk")
    with pytest.raises(ValueError, match="context_length must be an int"):
        load_model(missing, context_length="long")
    with pytest.raises(ValueError, match="either load_in_4bit=True or quantization_config"):
        load_model(missing, load_in_4bit=True, quantization_config=object())


def test_extend_context_shorter_than_current_fails(saved_base):
    model = load_model(str(saved_base), context_length=256, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="shorter than the model's current context of 256"):
        extend_context(model, 128)


def test_qlora_adapter_records_its_4bit_base_and_merge_follows(saved_base, tmp_path):
    """A QLoRA adapter records base_quantization='nf4'; merge without --from-4bit then merges into the dequantised
    NF4 base (the weights it was trained against), bit for bit as --from-4bit; --no-from-4bit into the fp base."""
    from safetensors.torch import load_file

    from hf_longlora import cli

    model = load_model(str(saved_base), load_in_4bit=True, context_length=256)
    peft_model = get_longlora_model(model)
    train_steps(peft_model, torch.randint(0, 128, (1, 128)), 2)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_quantization"] == "nf4"
    runs = {"default": [], "from4": ["--from-4bit"], "fp": ["--no-from-4bit"]}
    weights = {}
    for name, flags in runs.items():
        out = tmp_path / name
        assert (
            cli.main(
                ["merge", "--base", str(saved_base), "--adapter", str(adapter), "--out", str(out), *flags]
            )
            == 0
        )
        weights[name] = load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(weights["default"][q], weights["from4"][q])
    assert not torch.equal(weights["default"][q].float(), weights["fp"][q].float())
    # and a full-precision adapter records no quantization
    plain = get_longlora_model(load_model(str(saved_base), context_length=256))
    assert plain.peft_config["default"].base_quantization is None
