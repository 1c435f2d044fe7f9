"""The offline text and the small BPE tokenizer that examples and tests train on it."""

import pytest

from hf_longlora.data import pydoc_topics_text, train_bpe_tokenizer
from hf_longlora.data.tokenizer import chunks


def test_offline_bpe_round_trips_text_and_has_special_tokens():
    text = pydoc_topics_text()
    assert len(text) > 700_000
    tokenizer = train_bpe_tokenizer(chunks(text, 5000, limit=100_000), 400)
    assert len(tokenizer) == 400
    sample = text[200_000:201_000]
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample
    assert len(ids) < len(sample) / 2  # merges learned: fewer tokens than characters
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|user|>hi\n"


def test_chunks_and_bad_vocab_size():
    assert chunks("abcdefg", 3) == ["abc", "def", "g"]
    assert chunks("abcdefg", 3, limit=5) == ["abc", "de"]
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        train_bpe_tokenizer(["abc"], 100)
