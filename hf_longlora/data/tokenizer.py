"""A small byte-level BPE tokenizer trained offline (for tiny models in examples and tests; no Hub download)."""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# a minimal chat template, so TRL's chat-template paths work with the tiny tokenizer
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, individual_digits: bool = False):
    """A byte-level BPE (``tokenizers``) trained on ``texts``, as a transformers fast tokenizer.

    It has ``<s>``, ``</s>`` and ``<pad>`` as BOS, EOS and padding tokens and a minimal chat template.
    ``individual_digits=True`` splits numbers into one token per digit (as Llama's and Mistral's tokenizers do),
    so a passkey of 5 digits is 5 tokens a small model can copy one by one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if individual_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chunks(text: str, size: int, limit: int | None = None) -> list[str]:
    """``text[:limit]`` cut into pieces of ``size`` characters (the BPE trainer's input)."""
    end = len(text) if limit is None else min(limit, len(text))
    return [text[i : min(i + size, end)] for i in range(0, end, size)]
