"""A tiny Llama base for the CPU configs: random weights, native context 256, a BPE tokenizer trained offline.

It exists so both stages run in seconds on a laptop or in CI (plumbing, not quality: for a real pretrained base
on CPU use ``model_name_or_path: smollm2``, or ``make demo`` for a tiny base that is pretrained first).

    python examples/launch/tiny_base.py --out outputs/cpu_tiny/base
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_longlora.data import pydoc_topics_text, train_bpe_tokenizer
from hf_longlora.data.tokenizer import chunks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/cpu_tiny/base")
    parser.add_argument("--native", type=int, default=256, help="native context (max_position_embeddings)")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # byte-level BPE on prose that ships with every Python (pydoc_data/topics.py)
    tokenizer = train_bpe_tokenizer(chunks(pydoc_topics_text(), 10_000, limit=300_000), args.vocab_size)
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.native,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"tiny Llama base (native context {args.native}, vocabulary {len(tokenizer)}) saved to {args.out}")


if __name__ == "__main__":
    main()
