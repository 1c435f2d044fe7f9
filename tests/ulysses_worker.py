"""A few LongLoRA training steps of a tiny Llama, with or without Ulysses sequence parallelism.

``torchrun --nproc_per_node SP tests/ulysses_worker.py OUT HEADS KV_HEADS`` runs them with one packed sequence
split across SP ranks (gloo); ``tests/test_ulysses.py`` runs :func:`train` in one process on the whole sequence and
compares the per-step losses and the adapter's gradients.
"""

from __future__ import annotations

import sys

import torch

DOCUMENTS = [27, 20, 17]  # one packed row of 64 tokens; the documents do not align with the ranks' shards
STEPS = 4


def build(heads: int, kv_heads: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_longlora

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=heads * 8, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
        intermediate_size=64, num_hidden_layers=2, vocab_size=128, s2_group_size=8,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="s2_attention", dtype=torch.float32)
    return hf_longlora.get_longlora_model(
        model, hf_longlora.LongLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    )


def batch(length_multiple_of: int = 1) -> dict:
    generator = torch.Generator().manual_seed(1)
    lengths = list(DOCUMENTS)
    ids = torch.randint(0, 128, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}


def train(model, rank: int = 0, world_size: int = 1, steps: int = STEPS) -> tuple[list[float], list[dict]]:
    """Per-step whole-sequence losses, and per step the adapter's gradients (summed over the ranks)."""
    from hf_longlora.training.sequence_parallel import sequence_parallel_loss, shard_batch, sum_gradients

    model.train()
    # SGD: its update is linear in the gradient, so fp32 rounding differences stay rounding-sized over the steps
    # (AdamW divides by sqrt(v): a gradient that is 0 up to rounding flips the sign of a full-size update)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    shard = shard_batch(batch(), rank, world_size)
    losses, grads = [], []
    for _ in range(steps):
        logits = model(
            input_ids=shard["input_ids"], position_ids=shard["position_ids"], use_cache=False
        ).logits
        loss, whole = sequence_parallel_loss(logits, shard["shift_labels"])
        loss.backward()
        if world_size > 1:
            sum_gradients(model)
        losses.append(whole.item())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def main(out: str, heads: int, kv_heads: int) -> None:
    import torch.distributed as dist

    from hf_longlora.attention import backend
    from hf_longlora.attention.ulysses import register_s2_ulysses

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(heads, kv_heads)
    register_s2_ulysses(model, sequence_parallel_size=world)
    before = backend.ATTENTION_CALLS["s2"]
    losses, grads = train(model, rank, world)
    if rank == 0:
        s2_calls = backend.ATTENTION_CALLS["s2"] - before
        torch.save({"losses": losses, "grads": grads, "s2_calls": s2_calls}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
