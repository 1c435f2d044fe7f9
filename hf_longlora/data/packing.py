"""Pack tokenized documents into fixed-length training blocks, LongLoRA-style.

The original LongLoRA joins documents with EOS and cuts the stream into blocks of the target context. With
``document_boundaries=True`` each block also carries ``position_ids`` that restart at every document start, so the
``s2_attention`` backend (like transformers' packed-sequence masking) keeps documents apart and restarts its
groups at each document.
"""

from __future__ import annotations

from collections.abc import Sequence


def tokenize_documents(tokenizer, documents: Sequence[str]) -> list[list[int]]:
    """Token ids per document, without special tokens (EOS is added by :func:`pack_documents`)."""
    return [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in documents]


def pack_documents(
    token_lists: Sequence[Sequence[int]],
    block_size: int,
    eos_token_id: int,
    *,
    document_boundaries: bool = False,
    drop_last: bool = True,
) -> list[dict[str, list[int]]]:
    """Concatenate documents (each followed by EOS) and cut into blocks of ``block_size`` tokens.

    Returns:
        ``[{"input_ids": [...], "labels": [...]}, ...]``, plus ``"position_ids"`` restarting at each document start
        within a block when ``document_boundaries``. The last partial block is dropped unless ``drop_last=False``.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    stream: list[int] = []
    positions: list[int] = []
    for tokens in token_lists:
        doc = list(tokens) + [eos_token_id]
        stream += doc
        positions += list(range(len(doc)))
    blocks = []
    for start in range(0, len(stream), block_size):
        ids = stream[start : start + block_size]
        if len(ids) < block_size and drop_last:
            break
        block = {"input_ids": ids, "labels": list(ids)}
        if document_boundaries:
            pos = positions[start : start + block_size]
            # the tail of a document cut by the block start counts from 0 in this block
            restart = next((i for i, p in enumerate(pos) if p == 0), len(pos))
            block["position_ids"] = [p - pos[0] for p in pos[:restart]] + pos[restart:]
        blocks.append(block)
    return blocks
