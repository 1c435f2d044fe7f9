"""Data for long-context training: offline corpora, packing into blocks, LongAlpaca records, passkey prompts."""

from .corpora import read_text_corpus, stdlib_documents
from .packing import pack_documents, tokenize_documents
from .passkey import passkey_prompt

__all__ = ["pack_documents", "passkey_prompt", "read_text_corpus", "stdlib_documents", "tokenize_documents"]
