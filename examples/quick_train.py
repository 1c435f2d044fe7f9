"""The smallest real LongLoRA run: a tiny Llama trained at 4x its context on offline text, on CPU.

What it does (about a minute on 2 CPU cores):
1. reads long prose that ships with every Python (``pydoc_data/topics.py``, ~750k characters) and
   tokenizes it with a byte-level BPE trained on the spot with the ``tokenizers`` library;
2. pretrains a tiny Llama from scratch at a native context of ``--native`` tokens (full attention);
3. extends it 4x with linear RoPE position interpolation and wraps it in LoRA (q/k/v/o) with trainable
   embeddings and norms (LongLoRA's recipe) through PEFT;
4. trains ``--steps`` steps at 4x the context with ``attn_implementation="s2_attention"`` through the
   transformers Trainer, printing the loss, and reports held-out perplexity at the target context with full
   attention (eval mode) before and after.

    python examples/quick_train.py [--steps 30] [--native 256] [--out outputs/quick_train]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

import hf_longlora


def offline_text() -> str:
    path = Path(importlib.util.find_spec("pydoc_data").origin).parent / "topics.py"
    return path.read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return tokenizer


def blocks(ids: list[int], length: int) -> list[list[int]]:
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]


def trainer_args(out: str, steps: int, lr: float, batch: int, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        warmup_steps=max(1, steps // 10),
        logging_steps=max(1, steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )


@torch.no_grad()
def perplexity(model, eval_blocks: list[list[int]]) -> float:
    model.eval()  # eval mode: full attention
    losses = [model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item() for b in eval_blocks]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="LongLoRA steps at the extended context")
    parser.add_argument("--base-steps", type=int, default=200, help="pretraining steps at the native context")
    parser.add_argument("--native", type=int, default=256, help="the tiny model's native context")
    parser.add_argument("--factor", type=int, default=4, help="context extension factor")
    parser.add_argument("--out", default="outputs/quick_train")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    target = args.native * args.factor

    text = offline_text()
    tokenizer = train_tokenizer(text, vocab_size=2048)
    ids = tokenizer.encode(text).ids
    split = int(0.95 * len(ids))
    train_blocks, eval_blocks = blocks(ids[:split], target), blocks(ids[split:], target)
    print(
        f"corpus: {len(text):,} characters -> {len(ids):,} tokens; {len(train_blocks)} training blocks of {target}"
    )

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.native,
        s2_group_size_ratio=0.25,
    )
    model = LlamaForCausalLM(config)
    native_blocks = blocks(ids[:split], args.native)
    base_data = Dataset.from_dict({"input_ids": native_blocks, "labels": native_blocks})
    print(f"1) pretraining the base at its native context of {args.native} tokens ({args.base_steps} steps)")
    Trainer(
        model=model,
        args=trainer_args(f"{args.out}/base", args.base_steps, 3e-3, 8, args.seed),
        train_dataset=base_data,
        data_collator=default_data_collator,
    ).train()
    eval_blocks = eval_blocks[:4]
    ppl_native = perplexity(model, blocks(ids[split:], args.native)[:16])

    # 2) position interpolation: the native positions stretched `factor` times
    model.config.rope_parameters = {
        "rope_type": "linear",
        "factor": float(args.factor),
        "rope_theta": 10000.0,
    }
    model.config.max_position_embeddings = target
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    ppl_before = perplexity(model, eval_blocks)
    print(
        f"2) position interpolation x{args.factor}: perplexity at {target} tokens before LongLoRA {ppl_before:.1f}"
    )

    model.set_attn_implementation(hf_longlora.S2_ATTENTION)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        # LongLoRA: embeddings and every norm train too ("norm" also matches the layers' norms)
        modules_to_save=["embed_tokens", "norm"],
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    train = Dataset.from_dict({"input_ids": train_blocks, "labels": train_blocks})
    print(f"3) LongLoRA at {target} tokens with S2-Attn ({args.steps} steps)")
    trainer = Trainer(
        model=model,
        args=trainer_args(args.out, args.steps, 2e-3, 1, args.seed),
        train_dataset=train,
        data_collator=default_data_collator,
    )
    result = trainer.train()
    ppl_after = perplexity(model, eval_blocks)
    print(
        f"trained {result.global_step} steps at {target} tokens with S2-Attn: mean loss {result.training_loss:.3f}"
    )
    print(f"held-out perplexity (full attention): native {args.native} tokens {ppl_native:.1f} (base)")
    print(
        f"                                      {target} tokens {ppl_before:.1f} before -> {ppl_after:.1f} after"
    )
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
