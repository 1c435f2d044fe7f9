"""Data for long-context training and evaluation: offline corpora, packing into blocks, LongAlpaca records, passkey
prompts, RULER's synthetic task prompts.

Plain text and token ids in, records out: it knows no model, adapter or trainer, and imports nothing else of
hf_longlora.
"""

from .corpora import pydoc_topics_text, read_text_corpus, stdlib_documents
from .longalpaca_sample import build_longalpaca_sample
from .packing import pack_documents, tokenize_documents
from .passkey import passkey_documents, passkey_prompt
from .ruler import RULER_TASKS, generation_budget, ruler_prompt
from .tokenizer import train_bpe_tokenizer

__all__ = [
    "RULER_TASKS",
    "build_longalpaca_sample",
    "generation_budget",
    "pack_documents",
    "passkey_documents",
    "passkey_prompt",
    "pydoc_topics_text",
    "read_text_corpus",
    "ruler_prompt",
    "stdlib_documents",
    "tokenize_documents",
    "train_bpe_tokenizer",
]
