"""Shared helpers for the tests: tiny configs, real attention modules, random inputs."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaAttention

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=512,
)

CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_config(arch: str = "llama", **overrides):
    kwargs = dict(TINY)
    kwargs.update(overrides)
    return CONFIG_CLASSES[arch](**kwargs)


def attention_module(
    heads: int, kv_heads: int, head_dim: int, *, training: bool = True, **knobs
) -> LlamaAttention:
    """A real LlamaAttention whose config carries the S2 knobs; the tests call the backend with it."""
    config = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=8,
        num_hidden_layers=1,
        vocab_size=8,
        **knobs,
    )
    module = LlamaAttention(config, layer_idx=0)
    module.train(training)
    return module


def random_qkv(batch, heads, kv_heads, length, head_dim, *, dtype=torch.float64, seed=0, requires_grad=False):
    """q (B, H, L, D), k/v (B, Hkv, L, D) laid out as transformers lays them out: transposed views of (B, L, H, D)."""
    g = torch.Generator().manual_seed(seed)

    def make(h):
        t = torch.randn(batch, length, h, head_dim, generator=g, dtype=torch.float64).to(dtype)
        t = t.transpose(1, 2)
        if requires_grad:
            t = t.detach().requires_grad_(True)
        return t

    return make(heads), make(kv_heads), make(kv_heads)


def padding_mask_4d(lengths: list[int], total: int, side: str) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """transformers' sdpa mask for a padded batch and the reference's document positions."""
    from transformers.masking_utils import sdpa_mask

    mask2d = torch.zeros(len(lengths), total, dtype=torch.bool)
    docs = []
    for b, n in enumerate(lengths):
        start = total - n if side == "left" else 0
        mask2d[b, start : start + n] = True
        docs.append([list(range(start, start + n))])
    mask4d = sdpa_mask(
        batch_size=len(lengths),
        q_length=total,
        kv_length=total,
        attention_mask=mask2d,
        allow_is_causal_skip=False,
        device=torch.device("cpu"),
    )
    return mask4d, docs


def train_tiny_tokenizer(vocab_size: int = 400):
    """A real byte-level BPE trained on offline text (pydoc's topics), as a transformers fast tokenizer."""
    from hf_longlora.data import pydoc_topics_text, train_bpe_tokenizer
    from hf_longlora.data.tokenizer import chunks

    return train_bpe_tokenizer(chunks(pydoc_topics_text(), 5000, limit=200_000), vocab_size)


def make_tiny_checkpoint(
    path, arch: str = "llama", max_position_embeddings: int = 64, seed: int = 0, **overrides
):
    """Save a tiny randomly initialised causal LM with a real tokenizer to `path`; returns the path."""
    from transformers import AutoModelForCausalLM

    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(
        arch,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_steps(model, ids, steps: int, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps of a (PEFT) causal LM on `ids` as its own labels, in train mode; returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def sliding_window_mask(length: int, window: int) -> torch.Tensor:
    """transformers' sdpa mask for one sequence with a sliding window (i attends j iff i - window < j <= i)."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    return sdpa_mask(
        batch_size=1,
        q_length=length,
        kv_length=length,
        mask_function=sliding_window_causal_mask_function(window),
        allow_is_causal_skip=False,
        device="cpu",
    )


def chain_model(checkpoint, tokenizer, chain: list[int]):
    """A real Llama whose greedy decoding we set by hand: attention and MLP outputs are zero (o_proj, down_proj),
    so the last layer's hidden state is the current token's embedding, and the head maps ``chain[i]`` to
    ``chain[i + 1]`` (the last token to itself). Tokens of the chain get one-hot embeddings; must be distinct."""
    assert len(set(chain)) == len(chain), chain
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa", dtype=torch.float32)
    assert model.config.hidden_size >= len(chain) and not model.config.tie_word_embeddings
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for i, token in enumerate(chain):
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[chain[min(i + 1, len(chain) - 1)], i] = 1.0
    return model.eval()


def peak_allocated_bytes(fn) -> tuple[object, int]:
    """``(fn(), peak)``: the most bytes torch's CPU allocator held at once during ``fn``, above what it held before.

    From the allocator's own events (``torch.profiler`` with ``profile_memory=True``), as
    ``benchmarks/step_bench/tracker.py`` does for a whole step.
    """
    from torch._C._profiler import _EventType

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        result = fn()
    events = []

    def visit(event):
        if event.typed[0] == _EventType.Allocation:
            events.append((event.start_time_ns, event.typed[1].alloc_size))
        for child in event.children:
            visit(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        visit(root)
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return result, peak
