"""Long-context evaluation with full attention: perplexity per context length, passkey retrieval, RULER's synthetic
tasks, forgetting.

- :func:`perplexity`: LongLoRA's sliding-window protocol (windows of the evaluated length every ``stride`` = 256
  tokens) or non-overlapping windows, over a token stream;
- :func:`passkey_accuracy`: LongLoRA's passkey retrieval, accuracy per length and depth;
- :func:`ruler_accuracy`: RULER's NIAH variants, variable tracking and common-word extraction (offline prompts of
  :mod:`hf_longlora.data.ruler`), accuracy per task and length (``string_match_all``);
- :func:`load_for_evaluation`: a base model (optionally position-interpolated), an adapter or a merged model;
- :func:`evaluate_models`: several models side by side on the same windows and prompts, with JSON, a table and
  PNG plots (``hf-longlora eval`` on the command line).

It reads models from any stage (base, adapter, merged) through ``hf_longlora.adapters`` and scores them with
the chunked loss of ``hf_longlora.training.loss``; it trains nothing and parses no command lines.
"""

from .models import EvalModel, load_for_evaluation
from .passkey import passkey_accuracy
from .perplexity import perplexity, token_stream, window_starts
from .ruler import ruler_accuracy, string_match_all
from .run import EvalSettings, ModelSpec, evaluate_models, format_table, summary_of, write_outputs

__all__ = [
    "EvalModel",
    "EvalSettings",
    "ModelSpec",
    "evaluate_models",
    "format_table",
    "load_for_evaluation",
    "passkey_accuracy",
    "perplexity",
    "ruler_accuracy",
    "string_match_all",
    "summary_of",
    "token_stream",
    "window_starts",
    "write_outputs",
]
