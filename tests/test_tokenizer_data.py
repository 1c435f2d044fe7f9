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


def test_individual_digits_split_numbers_and_round_trip():
    text = pydoc_topics_text()
    plain = train_bpe_tokenizer(chunks(text, 5000, limit=300_000), 2048)
    split = train_bpe_tokenizer(chunks(text, 5000, limit=300_000), 2048, individual_digits=True)
    sample = "The pass key is 40312. Remember it. 2024 is a year."
    assert [t for t in split.tokenize(sample) if t.strip("Ġ").isdigit()] == list("40312") + list("2024")
    assert split.decode(split(sample, add_special_tokens=False)["input_ids"]) == sample
    assert len(plain.tokenize(" 2024")) < 5  # the plain one merges digits


def test_passkey_documents_hide_one_key_and_answer_it():
    import re

    from hf_longlora.data import passkey_documents
    from hf_longlora.data.passkey import FILLER, QUESTION

    text = pydoc_topics_text()
    tokenizer = train_bpe_tokenizer(chunks(text, 5000, limit=100_000), 400, individual_digits=True)
    haystacks = [text[i : i + 5000] for i in range(0, 50_000, 5000)]
    docs = passkey_documents(tokenizer, 40, 250, 450, haystacks=haystacks, seed=3)
    assert docs == passkey_documents(tokenizer, 40, 250, 450, haystacks=haystacks, seed=3)
    assert docs != passkey_documents(tokenizer, 40, 250, 450, haystacks=haystacks, seed=4)
    lengths, in_prose = [], 0
    for doc in docs:
        key = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\. ", doc).group(1)
        assert doc.endswith(f"{QUESTION} {key}.") and doc.count(key) == 3
        in_prose += FILLER not in doc
        lengths.append(len(tokenizer(doc, add_special_tokens=False)["input_ids"]))
    assert 10 <= in_prose <= 30  # about half hide the needle in prose
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])  # the filler's granularity
    assert min(lengths) >= 250 - per_filler and max(lengths) <= 450 + 8 and max(lengths) - min(lengths) > 100
    with pytest.raises(ValueError, match="haystack_fraction > 0 needs haystacks"):
        passkey_documents(tokenizer, 2, 64, 100)
    with pytest.raises(ValueError, match="min_length <= max_length"):
        passkey_documents(tokenizer, 2, 100, 64, haystack_fraction=0.0)
    only_filler = passkey_documents(tokenizer, 5, 250, 300, haystack_fraction=0.0)
    assert all(FILLER in d for d in only_filler)
