"""Perplexity on long documents at several context lengths (LongLoRA's protocol, full attention).

LongLoRA's ``eval.py`` concatenates the evaluation documents into one token stream and scores windows of the
evaluated length ``L`` that start every ``stride`` tokens (256 in the paper). Every token of a window is scored
(the first only as context), the window's loss is the mean over its tokens, and the perplexity is
``exp(mean over windows)``::

    stream  |=====================================================================|
    stride  |--256--|
    window  [========== L ==========]
                    [========== L ==========]
                            [========== L ==========]          ... every `stride` tokens

``mode="non_overlapping"`` cuts the stream into consecutive windows of ``L`` (``stride = L``). With
``max_windows``, an evenly spaced subset of the windows is scored (the first and the last are always in it), so
a CPU evaluation covers the whole stream in bounded time. The same windows are used for every model evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

PERPLEXITY_MODES = ("sliding", "non_overlapping")
DEFAULT_STRIDE = 256


def token_stream(documents: Sequence[Sequence[int]], eos_token_id: int | None) -> list[int]:
    """The documents' token ids concatenated, each followed by ``eos_token_id`` (if given)."""
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        if eos_token_id is not None:
            stream.append(eos_token_id)
    return stream


def window_starts(
    n_tokens: int,
    length: int,
    *,
    stride: int = DEFAULT_STRIDE,
    mode: str = "sliding",
    max_windows: int | None = None,
) -> list[int]:
    """Start offsets of the windows of ``length`` tokens scored in a stream of ``n_tokens`` tokens.

    Raises ValueError for a bad argument (naming it) or a stream shorter than one window.
    """
    if mode not in PERPLEXITY_MODES:
        raise ValueError(f"mode must be one of {PERPLEXITY_MODES}, got {mode!r}")
    if length < 2:
        raise ValueError(f"context lengths must be >= 2 tokens, got {length}")
    if mode == "sliding" and stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    if n_tokens < length:
        raise ValueError(f"the evaluation text has {n_tokens} tokens, fewer than one window of {length}")
    step = length if mode == "non_overlapping" else stride
    starts = list(range(0, n_tokens - length + 1, step))
    if max_windows is not None and len(starts) > max_windows:
        if max_windows == 1:
            return [starts[0]]
        picks = [round(i * (len(starts) - 1) / (max_windows - 1)) for i in range(max_windows)]
        starts = [starts[i] for i in picks]
    return starts


@torch.no_grad()
def window_losses(
    model: torch.nn.Module, stream: Sequence[int], length: int, starts: Sequence[int], *, batch_size: int = 1
) -> list[float]:
    """Mean next-token loss of each window ``stream[s : s + length]`` (full attention: the model in eval mode).

    The LM head and cross-entropy run a chunk of tokens at a time (:mod:`hf_longlora.training.loss`), so the full
    ``(batch, length, vocab)`` logits never exist: an 8k window of a 49k-vocabulary model would need 3 GiB for them.
    """
    from ..training.loss import chunked_causal_lm_loss, supports_chunked_loss

    device = next(model.parameters()).device
    data = torch.tensor(stream, dtype=torch.long)
    chunked = supports_chunked_loss(model)
    losses: list[float] = []
    for i in range(0, len(starts), batch_size):
        batch = torch.stack([data[s : s + length] for s in starts[i : i + batch_size]]).to(device)  # (B, L)
        if chunked:
            out = model(input_ids=batch, use_cache=False, logits_to_keep=1, output_hidden_states=True)
            hidden = out.hidden_states[-1]  # (B, L, C)
            head = model.get_output_embeddings()
            losses += [
                chunked_causal_lm_loss(hidden[b : b + 1], head, batch[b : b + 1]).item()
                for b in range(len(batch))
            ]
        else:
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            losses += nll.mean(dim=1).tolist()  # (B,)
    return losses


def perplexity(
    model: torch.nn.Module,
    stream: Sequence[int],
    lengths: Sequence[int],
    *,
    stride: int = DEFAULT_STRIDE,
    mode: str = "sliding",
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    description: str = "perplexity",
) -> dict[int, float]:
    """Perplexity at each context length in ``lengths`` over a token stream; ``{length: perplexity}``.

    The model is put in eval mode (full attention; the ``s2_attention`` backend also falls back to full
    attention outside training) and restored afterwards. Windows: see the module docstring.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plans = {
        n: window_starts(len(stream), n, stride=stride, mode=mode, max_windows=max_windows) for n in lengths
    }
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    results: dict[int, float] = {}
    try:
        with tqdm(
            total=sum(map(len, plans.values())), desc=description, unit="window", disable=not progress
        ) as bar:
            for n, starts in plans.items():
                losses = []
                for i in range(0, len(starts), batch_size):
                    losses += window_losses(
                        model, stream, n, starts[i : i + batch_size], batch_size=batch_size
                    )
                    bar.update(len(starts[i : i + batch_size]))
                results[n] = math.exp(sum(losses) / len(losses))
    finally:
        model.train(was_training)
    return results
