"""Targeted mutation testing: put one plausible bug at a time into a copy of hf_longlora and check a test fails.

Each entry of ``MUTATIONS`` names a file under hf_longlora/, an exact snippet of it (which must occur exactly once),
its replacement (the bug), what the bug means, and the smallest set of tests that should notice. For each one the
script copies hf_longlora/, tests/, examples/ and pyproject.toml (the pytest settings) to a temporary directory, applies the
one replacement there, checks that Python imports the copy (not /work/main's editable install), and runs::

    python -m pytest -x -q -p no:cacheprovider -m "not slow" <tests>

with ``PYTHONPATH`` pointing at the copy. A failing run kills the mutation; a passing run means it SURVIVED (the
tests miss that bug). Any other pytest exit code (no tests collected, usage error) is reported as ERROR. Rows
whose killing test is slow run with ``-m ""``.

Usage (from the repository root; ``make mutations`` runs them all)::

    python tools/mutations.py                 # every mutation, then the table
    python tools/mutations.py --only roll     # the mutations whose name contains "roll"
    python tools/mutations.py --only gen- --only passkey   # either substring
    python tools/mutations.py --list          # the list, each snippet checked against the sources, no tests
    python tools/mutations.py --baseline      # first run the selected tests unmutated (they must pass)

Exit status: 0 when every selected mutation was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLS = "tests/test_mutation_kills.py"
# pytest exit codes: 0 all passed, 1 some test failed; anything else is a problem with the run itself
PASSED, FAILED = 0, 1
TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # exact text, found exactly once
    replacement: str
    description: str
    tests: tuple[str, ...]  # test files or node ids, relative to the repository root
    slow: bool = False  # the killing test is marked slow: run with -m ""


def _m(name, file, original, replacement, description, *tests, slow=False) -> Mutation:
    return Mutation(name, file, original, replacement, description, tests or (KILLS,), slow)


BACKEND = "hf_longlora/attention/backend.py"
SDPA = "hf_longlora/attention/sdpa.py"
LOSS = "hf_longlora/training/loss.py"
LIFECYCLE = "hf_longlora/adapters/lifecycle.py"
CONTEXT = "hf_longlora/adapters/context.py"
MERGE = "hf_longlora/adapters/merge.py"
CHECKS = "hf_longlora/training/checks.py"
CLI = "hf_longlora/cli.py"
RELIABILITY = "tests/test_reliability.py"
STARTUP = "tests/test_cli_startup.py"
GENERATED = "tests/test_attention_parity.py::test_generated_masks_match_dense_reference"
GENERATED_DROPOUT = (
    "tests/test_attention_parity.py::test_generated_masks_with_dropout_match_the_reference_weights"
)
MODELS = "tests/test_models.py"
PASSKEY = "hf_longlora/evaluation/passkey.py"
PASSKEY_TEST = "tests/test_evaluation.py::test_passkey_scores_hits_and_misses_of_known_generations"

MUTATIONS: list[Mutation] = [
    # ---- issue #17: bugs that survived the whole suite
    _m(
        "dense-roll-forward-permutation",
        BACKEND,
        "rank = torch.empty_like(rank).index_copy(0, torch.tensor(permutation, device=device), rank)",
        "rank = torch.tensor(permutation, device=device)",
        'dense fallback with "roll" applies the forward instead of the inverse permutation',
    ),
    _m(
        "dense-float-mask-ignores-s2",
        BACKEND,
        'keep = m.masked_fill(~allowed[half][:, None], float("-inf"))',
        "keep = m.clone()",
        "a float (additive) mask in the dense path ignores the S2 pattern",
    ),
    _m(
        "dropout-dropped-on-s2-path",
        BACKEND,
        "q, k, v, plan, order, scale=scaling, dropout=dropout,",
        "q, k, v, plan, order, scale=scaling, dropout=0.0,",
        "attention dropout silently dropped on the S2 (packed) path",
    ),
    _m(
        "dropout-dropped-in-packed-pieces",
        BACKEND,
        "out = varlen(q, k, v, cu_seqlens, scale=scale, dropout_p=dropout, **extra)",
        "out = varlen(q, k, v, cu_seqlens, scale=scale, dropout_p=0.0, **extra)",
        "_attend_packed does not pass dropout to the varlen kernel",
    ),
    _m(
        "dropout-dropped-in-sdpa-varlen",
        SDPA,
        "q, k, v, dropout_p=dropout_p, is_causal=length > 1",
        "q, k, v, dropout_p=0.0, is_causal=length > 1",
        "sdpa_varlen_attention ignores dropout_p",
    ),
    _m(
        "dropout-dropped-in-dense-path",
        BACKEND,
        "attn_mask=keep,\n                    dropout_p=dropout,",
        "attn_mask=keep,\n                    dropout_p=0.0,",
        "attention dropout silently dropped on the dense fallback",
    ),
    _m(
        "window-with-roll-fast-path",
        BACKEND,
        'if layout.mask_kind == "window" and plan.shifted_permutation is None:',
        'if layout.mask_kind == "window":',
        'a sliding window combined with "roll" takes the fast path (the wrap-around ignores the window)',
    ),
    _m(
        "ddp-average-tokens-scale-dropped",
        LOSS,
        "loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)",
        "loss = loss",
        "ChunkedLossTrainer drops DDP's average-tokens-across-devices scale",
    ),
    _m(
        "restore-dynamic-max-positions",
        LIFECYCLE,
        "text_config.max_position_embeddings = config.original_context_length if dynamic else config.context_length",
        "text_config.max_position_embeddings = config.context_length",
        "restore_context sets max_position_embeddings to the target for a dynamic-RoPE adapter",
    ),
    _m(
        "merge-skips-tokenizer-files",
        MERGE,
        "shutil.copy2(source / name, staging / name)",
        "pass",
        "merge does not copy the tokenizer files",
    ),
    # ---- backend error branches
    _m(
        "backend-accepts-position-bias",
        BACKEND,
        '_UNSUPPORTED_KWARGS = ("position_bias",)',
        "_UNSUPPORTED_KWARGS = ()",
        "position_bias is silently ignored instead of refused",
    ),
    _m(
        "backend-heads-not-multiple",
        BACKEND,
        "if num_heads % key.shape[1]:",
        "if False:",
        "query heads not a multiple of KV heads are not refused",
    ),
    _m(
        "backend-mask-not-4d",
        BACKEND,
        "if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (length, length):",
        "if False:",
        "a non-4D mask is not refused",
    ),
    _m(
        "backend-mask-shape-unchecked",
        BACKEND,
        "if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (length, length):",
        "if attention_mask.dim() != 4:",
        "a 4D mask of the wrong (L, L) size is not refused",
    ),
    _m(
        "backend-cu-seq-lens-range",
        BACKEND,
        "if cu[0] != 0 or cu[-1] != batch * length:",
        "if False:",
        "cu_seq_lens_q out of range is not refused",
    ),
    _m(
        "backend-cu-seq-lens-end-only",
        BACKEND,
        "if cu[0] != 0 or cu[-1] != batch * length:",
        "if cu[-1] != batch * length:",
        "cu_seq_lens_q not starting at 0 is not refused",
    ),
    _m(
        "backend-non-causal-gets-s2",
        BACKEND,
        "if not module.training or q_len != kv_len or q_len <= 1 or not causal:",
        "if not module.training or q_len != kv_len or q_len <= 1:",
        "a non-causal module gets S2-Attn (causal groups) instead of full sdpa",
    ),
    _m(
        "backend-all-padding-batch",
        BACKEND,
        "if plan.total_tokens == 0:",
        "if False:",
        "an all-padding batch reaches the kernels (no early zeros)",
    ),
    _m(
        "sdpa-varlen-bounds-unchecked",
        SDPA,
        "if cu_seqlens[0] != 0 or cu_seqlens[-1] != total:",
        "if False:",
        "sdpa_varlen_attention accepts cu_seqlens that do not span the tokens",
    ),
    _m(
        "sdpa-varlen-heads-unchecked",
        SDPA,
        "if num_heads % num_kv_heads:",
        "if False:",
        "sdpa_varlen_attention accepts heads not a multiple of KV heads",
    ),
    _m(
        "sdpa-varlen-not-causal",
        SDPA,
        "is_causal=length > 1,",
        "is_causal=False,",
        "sdpa_varlen_attention attends to later tokens of a segment",
    ),
    # ---- ChunkedLossTrainer's fallbacks to Trainer.compute_loss
    _m(
        "loss-no-fallback-label-smoothing",
        LOSS,
        "            or self.label_smoother is not None\n",
        "",
        "ChunkedLossTrainer ignores label smoothing",
    ),
    _m(
        "loss-no-fallback-compute-loss-func",
        LOSS,
        "            or self.compute_loss_func is not None\n",
        "",
        "ChunkedLossTrainer ignores a compute_loss_func",
    ),
    _m(
        "loss-no-fallback-return-outputs",
        LOSS,
        '            return_outputs\n            or "labels" not in inputs\n',
        '            "labels" not in inputs\n',
        "ChunkedLossTrainer returns no outputs for return_outputs=True",
    ),
    _m(
        "loss-no-fallback-without-labels",
        LOSS,
        '            or "labels" not in inputs\n',
        "",
        "ChunkedLossTrainer runs the chunked loss on a batch without labels",
    ),
    _m(
        "loss-no-fallback-logit-transforms",
        LOSS,
        "or not supports_chunked_loss(self.accelerator.unwrap_model(model))",
        "or False",
        "ChunkedLossTrainer ignores logit soft-capping (Gemma 2)",
    ),
    # ---- extend_context's refusals
    _m(
        "context-bad-target-accepted",
        CONTEXT,
        "if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length < 1:",
        "if False:",
        "extend_context accepts a non-int or non-positive target",
    ),
    _m(
        "context-bool-target-accepted",
        CONTEXT,
        "if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length < 1:",
        "if not isinstance(target_length, int) or target_length < 1:",
        "extend_context accepts True as a target length",
    ),
    _m(
        "context-not-a-model-accepted",
        CONTEXT,
        '    raise TypeError(\n        "extend_context: model_or_config must be',
        '    return model_or_config, None\n    raise TypeError(\n        "extend_context: model_or_config must be',
        "extend_context takes anything as a config",
    ),
    _m(
        "context-no-rope-accepted",
        CONTEXT,
        "    if not current_params:\n",
        "    if False:\n",
        "extend_context does not refuse a model without RoPE",
    ),
    _m(
        "context-per-layer-rope-accepted",
        CONTEXT,
        'if "full_attention" in current_params or "sliding_attention" in current_params:',
        "if False:",
        "extend_context does not refuse per-layer-type RoPE parameters",
    ),
    _m(
        "context-already-scaled-accepted",
        CONTEXT,
        'if current_type != "default" and not extended_before:',
        "if False:",
        "extend_context compounds a RoPE scaling it did not set (e.g. llama3)",
        "tests/test_adapters.py::test_extend_context_refuses_already_scaled_rope",
    ),
    _m(
        "context-shorter-target-accepted",
        CONTEXT,
        "    if target_length < current:\n",
        "    if False:\n",
        "extend_context shortens the context",
    ),
    _m(
        "context-dynamic-max-positions",
        CONTEXT,
        'config.max_position_embeddings = original if method == "dynamic" else target_length',
        "config.max_position_embeddings = target_length",
        "extend_context sets max_position_embeddings to the target for dynamic NTK",
    ),
    _m(
        "context-linear-factor-not-ceil",
        CONTEXT,
        'params.update(rope_type="linear", factor=float(math.ceil(target_length / original_length)))',
        'params.update(rope_type="linear", factor=float(target_length / original_length))',
        "linear interpolation uses a fractional factor (LongLoRA rounds it up)",
    ),
    # ---- lifecycle: context record, base quantization
    _m(
        "record-base-quantization-lost",
        LIFECYCLE,
        'config.base_quantization = "nf4" if four_bit else None',
        "config.base_quantization = None",
        "a QLoRA adapter does not record its NF4 base (merge then uses the fp base)",
        "tests/test_quantized.py::test_qlora_adapter_records_its_4bit_base_and_merge_follows",
    ),
    _m(
        "context-record-contradiction-accepted",
        LIFECYCLE,
        "if context_length is not None and context_length != config.context_length:",
        "if False:",
        "a context_length contradicting the adapter's record is accepted",
        "tests/test_adapters.py::test_plain_peft_adapter_never_loses_its_extension_silently",
    ),
    _m(
        "context-record-missing-accepted",
        LIFECYCLE,
        'if context_length is None and getattr(config, "saved_as_longlora", False):',
        "if False:",
        "a plain-PEFT adapter without its context record loads at the base's context",
        "tests/test_adapters.py::test_plain_peft_adapter_never_loses_its_extension_silently",
    ),
    # ---- merge
    _m(
        "merge-tokenizer-base-before-adapter",
        MERGE,
        "for source in (Path(adapter_dir), Path(base)):",
        "for source in (Path(base), Path(adapter_dir)):",
        "merge copies the base's tokenizer over the adapter's own",
    ),
    _m(
        "merge-out-dir-inside-input",
        MERGE,
        "if out == source or source in out.parents or out in source.parents:",
        "if out == source or out in source.parents:",
        "merge accepts an out_dir inside its adapter (overwrite would delete it)",
        "tests/test_merge_and_hub.py::test_merge_refuses_an_out_dir_that_is_or_holds_an_input",
    ),
    _m(
        "merge-out-dir-containing-input",
        MERGE,
        "if out == source or source in out.parents or out in source.parents:",
        "if out == source or source in out.parents:",
        "merge accepts an out_dir that contains its base",
        "tests/test_merge_and_hub.py::test_merge_refuses_an_out_dir_that_is_or_holds_an_input",
    ),
    _m(
        "merge-non-empty-out-dir",
        MERGE,
        "if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:",
        "if False:",
        "merge replaces a non-empty out_dir without overwrite",
        "tests/test_merge_and_hub.py::test_merge_refuses_to_overwrite",
    ),
    # ---- training checks, schedule, arguments
    _m(
        "checks-unsupported-keys-accepted",
        CHECKS,
        "if values and values[0] != allowed:",
        "if False:",
        "keys the command would ignore (load_in_8bit, use_peft: false, ...) are accepted",
        f"{RELIABILITY}::test_sft_refuses_keys_it_would_ignore",
    ),
    _m(
        "checks-steps-minus-one-always",
        CHECKS,
        'if steps == -1 and (explicit is None or "num_train_epochs" in explicit):',
        "if steps == -1:",
        "max_steps: -1 accepted without num_train_epochs (trains transformers' default 3 epochs)",
        f"{RELIABILITY}::test_max_steps_minus_one_means_epochs_when_epochs_are_set",
    ),
    _m(
        "checks-steps-zero-accepted",
        CHECKS,
        "    if steps < 1:\n",
        "    if steps < 0:\n",
        "max_steps: 0 accepted (a run that trains nothing)",
        f"{RELIABILITY}::test_train_refuses_keys_it_would_ignore",
    ),
    _m(
        "checks-stale-checkpoints-overwritten",
        CHECKS,
        'if not getattr(longlora_args, "overwrite_output_dir", False):',
        "if False:",
        "another run's checkpoints are deleted without overwrite_output_dir",
    ),
    _m(
        "checks-stale-checkpoints-false-string",
        CHECKS,
        'training_args.resume_from_checkpoint not in (None, False, "", "false", "False")',
        "training_args.resume_from_checkpoint not in (None, False)",
        'resume_from_checkpoint: "false" counts as resuming',
    ),
    _m(
        "schedule-warmup-step-zero",
        "hf_longlora/training/schedule.py",
        "return min(1.0, (step + 1) / (warmup_steps + 1))",
        "return min(1.0, step / warmup_steps)",
        "warmup's first step has learning rate 0 (transformers' constant_with_warmup)",
        f"{RELIABILITY}::test_warmup_never_has_a_step_at_learning_rate_zero",
    ),
    _m(
        "arguments-as-list-splits-strings",
        "hf_longlora/training/arguments.py",
        "if isinstance(value, (str, bytes, int, float, os.PathLike)):",
        "if isinstance(value, (bytes, int, float, os.PathLike)):",
        "`corpus: stdlib` is read one character at a time",
        f"{RELIABILITY}::test_single_values_where_lists_are_expected",
    ),
    # ---- cli
    _m(
        "cli-dashed-flags-keeps-underscores",
        CLI,
        'arg = "--" + name.replace("_", "-") + sep + value',
        'arg = "--" + name + sep + value',
        "--max_windows is not the same flag as --max-windows",
        f"{RELIABILITY}::test_flags_accept_dashes_and_underscores_everywhere",
    ),
    _m(
        "cli-dashed-flags-after-double-dash",
        CLI,
        "            return out + argv[len(out) :]\n",
        "            pass\n",
        "arguments after `--` are rewritten too",
        f"{RELIABILITY}::test_flags_accept_dashes_and_underscores_everywhere",
    ),
    _m(
        "cli-read-config-line-off-by-one",
        CLI,
        'where = f" at line {mark.line + 1}, column {mark.column + 1}"',
        'where = f" at line {mark.line}, column {mark.column}"',
        "a YAML syntax error names the wrong line (0-based)",
        f"{RELIABILITY}::test_yaml_syntax_error_names_file_and_line",
    ),
    _m(
        "cli-read-config-non-mapping",
        CLI,
        "    if not isinstance(data, dict):\n",
        "    if False:\n",
        "a --config YAML that is a list is not refused",
    ),
    _m(
        "cli-read-config-empty",
        CLI,
        "    if data is None:\n        return {}\n",
        "",
        "an empty --config YAML fails instead of meaning no keys",
    ),
    _m(
        "cli-per-model-flag-to-first-model",
        CLI,
        "models[-1][self.dest] = values",
        "models[0][self.dest] = values",
        "--context-length after the second --model applies to the first",
        "tests/test_evaluation.py::test_eval_context_length_belongs_to_the_model_before_it",
    ),
    _m(
        "cli-per-model-flag-before-any-model",
        CLI,
        "        if not models:\n            parser.error(",
        "        if False:\n            parser.error(",
        "--context-length before any --model is not refused clearly",
        "tests/test_evaluation.py::test_eval_context_length_belongs_to_the_model_before_it",
    ),
    _m(
        "cli-model-action-forgets-models",
        CLI,
        "models = list(getattr(namespace, self.dest, None) or [])",
        "models = []",
        "each --model replaces the ones before it",
        "tests/test_evaluation.py::test_eval_context_length_belongs_to_the_model_before_it",
    ),
    # ---- _quiet, _registration
    _m(
        "quiet-drops-nothing",
        "hf_longlora/_quiet.py",
        "return not str(record.msg).startswith(self.prefixes)",
        "return True",
        "the named dependency log messages are not dropped",
        f"{STARTUP}::test_named_dependency_messages_are_dropped_and_nothing_else",
    ),
    _m(
        "quiet-drops-everything",
        "hf_longlora/_quiet.py",
        "return not str(record.msg).startswith(self.prefixes)",
        "return False",
        "every log message of those loggers is dropped, real problems too",
        f"{STARTUP}::test_named_dependency_messages_are_dropped_and_nothing_else",
    ),
    _m(
        "quiet-warnings-kept",
        "hf_longlora/_quiet.py",
        'warnings.filterwarnings("ignore", message=message, category=category)',
        "pass",
        "the named dependency warnings are not ignored",
        f"{STARTUP}::test_named_dependency_messages_are_dropped_and_nothing_else",
    ),
    _m(
        "registration-hook-never-registers",
        "hf_longlora/_registration.py",
        "        self.loader.exec_module(module)\n        _register()\n",
        "        self.loader.exec_module(module)\n",
        "import hf_longlora before transformers never registers s2_attention",
        f"{STARTUP}::test_registration_follows_transformers_either_order",
    ),
    _m(
        "registration-late-import-never-registers",
        "hf_longlora/_registration.py",
        "    if TRIGGER in sys.modules:\n        _register()\n",
        "    if TRIGGER in sys.modules:\n        pass\n",
        "import hf_longlora after transformers' modeling code never registers s2_attention",
        f"{STARTUP}::test_registration_follows_transformers_either_order",
    ),
    # ---- issue #17, second part: the strengthened tests (generated masks, model-level reference, end to end)
    _m(
        "gen-dense-per-head-mask-first-heads",
        BACKEND,
        "mask_heads = slice(q_heads.start, q_heads.stop) if model_mask.shape[1] > 1 else slice(None)",
        "mask_heads = slice(0, len(q_heads)) if model_mask.shape[1] > 1 else slice(None)",
        "a per-head (B, H, L, L) mask: every head piece gets the first heads' masks",
        GENERATED,
    ),
    _m(
        "gen-window-fast-path-off-by-one",
        BACKEND,
        "return max(plan.max_unshifted, plan.max_shifted) > layout.window",
        "return max(plan.max_unshifted, plan.max_shifted) > layout.window + 1",
        "a sliding window one token narrower than the longest S2 segment takes the fast path (window ignored)",
        GENERATED,
    ),
    _m(
        "gen-packed-padded-documents-ignored",
        BACKEND,
        "document_ids = _document_ids(batch, length, position_ids, cu_seq_lens, device)",
        "document_ids = _document_ids(batch, length, None, cu_seq_lens, device)",
        "packing with padding: restarting position_ids ignored, S2 groups run across the documents of a row",
        GENERATED,
    ),
    _m(
        "gen-float-mask-bias-dropped",
        BACKEND,
        'keep = m.masked_fill(~allowed[half][:, None], float("-inf"))',
        "keep = torch.zeros_like(m).masked_fill(~allowed[half][:, None] | (m <= torch.finfo(m.dtype).min), -torch.inf)",
        "an additive float mask is read as a bool mask: its bias is dropped",
        GENERATED,
    ),
    _m(
        "gen-float-mask-ignores-s2",
        BACKEND,
        'keep = m.masked_fill(~allowed[half][:, None], float("-inf"))',
        "keep = m.clone()",
        "a float (additive) mask in the dense path ignores the S2 pattern (generated masks)",
        GENERATED,
    ),
    _m(
        "gen-dense-roll-forward-permutation",
        BACKEND,
        "rank = torch.empty_like(rank).index_copy(0, torch.tensor(permutation, device=device), rank)",
        "rank = torch.tensor(permutation, device=device)",
        'dense fallback with "roll" applies the forward permutation (generated masks)',
        GENERATED,
    ),
    _m(
        "gen-window-with-roll-fast-path",
        BACKEND,
        'if layout.mask_kind == "window" and plan.shifted_permutation is None:',
        'if layout.mask_kind == "window":',
        'a sliding window with "roll" takes the fast path (generated masks)',
        GENERATED,
    ),
    _m(
        "gen-dropout-dropped-in-dense-path",
        BACKEND,
        "attn_mask=keep,\n                    dropout_p=dropout,",
        "attn_mask=keep,\n                    dropout_p=0.0,",
        "attention dropout dropped on the dense fallback (generated masks, one-hot values)",
        GENERATED_DROPOUT,
    ),
    _m(
        "gen-dropout-dropped-in-packed-pieces",
        BACKEND,
        "out = varlen(q, k, v, cu_seqlens, scale=scale, dropout_p=dropout, **extra)",
        "out = varlen(q, k, v, cu_seqlens, scale=scale, dropout_p=0.0, **extra)",
        "attention dropout dropped on the S2 (packed) path (generated masks, one-hot values)",
        GENERATED_DROPOUT,
    ),
    _m(
        "gen-dropout-dropped-in-sdpa-varlen",
        SDPA,
        "q, k, v, dropout_p=dropout_p, is_causal=length > 1",
        "q, k, v, dropout_p=0.0, is_causal=length > 1",
        "sdpa_varlen_attention ignores dropout_p (generated masks, one-hot values)",
        GENERATED_DROPOUT,
    ),
    _m(
        "reference-model-shift-removed",
        "hf_longlora/attention/groups.py",
        "shifted += shifted_segment_lengths(length, group)",
        "shifted += unshifted_segment_lengths(length, group)",
        "the shifted heads are not shifted (S2 with S2 comparisons cannot see it; the fp64 reference model can)",
        f"{MODELS}::test_padded_batch_rows_match_single_rows",
    ),
    _m(
        "reference-model-shift-removed-packed",
        "hf_longlora/attention/groups.py",
        "shifted += shifted_segment_lengths(length, group)",
        "shifted += unshifted_segment_lengths(length, group)",
        "the shifted heads are not shifted, seen on TRL's padding-free batches",
        f"{MODELS}::test_packed_batch_matches_documents_one_at_a_time",
    ),
    _m(
        "reference-model-packed-position-ids-ignored",
        BACKEND,
        "document_ids = _document_ids(batch, length, position_ids, cu_seq_lens, device)",
        "document_ids = _document_ids(batch, length, None, cu_seq_lens, device)",
        "a packed row marked by position_ids only: S2 groups do not restart at each document",
        f"{MODELS}::test_packed_batch_matches_documents_one_at_a_time",
    ),
    _m(
        "passkey-always-miss",
        PASSKEY,
        "hits += first_number(answer) == key",
        "hits += 0",
        "the passkey scorer never counts a hit",
        PASSKEY_TEST,
    ),
    _m(
        "passkey-always-hit",
        PASSKEY,
        "hits += first_number(answer) == key",
        "hits += 1",
        "the passkey scorer counts every answer as a hit",
        PASSKEY_TEST,
    ),
    _m(
        "passkey-prefix-is-a-hit",
        PASSKEY,
        "hits += first_number(answer) == key",
        'hits += (first_number(answer) or "").startswith(key)',
        "the passkey scorer accepts a longer number that starts with the key",
        PASSKEY_TEST,
    ),
    _m(
        "passkey-same-key-at-every-depth",
        PASSKEY,
        "seed=seed + 1_000_003 * n + 1009 * d_index + trial",
        "seed=seed + 1_000_003 * n + trial",
        "every depth of a length gets the same keys (the cells are not what they say)",
        PASSKEY_TEST,
    ),
    _m(
        "train-context-checked-after-loading",
        "hf_longlora/training/pretraining.py",
        "target = check_context_extension(\n        model_args.model_name_or_path, longlora_args, revision=model_args.model_revision\n    )",
        "target = longlora_args.context_length",
        "train validates the context extension only when loading (a bad config loads the model first)",
        "tests/test_training.py::test_train_bad_config_fails_before_loading",
    ),
    _m(
        "sft-data-read-after-loading",
        "hf_longlora/training/sft.py",
        "    raw = load_longalpaca(data_args, script_args, dataset_args)\n",
        "    load_for_training(model_args, longlora_args, training_args, target)\n"
        "    raw = load_longalpaca(data_args, script_args, dataset_args)\n",
        "sft loads the model before reading and checking its data",
        "tests/test_training.py::test_sft_bad_data_fails_before_loading",
    ),
    _m(
        "training-steps-use-full-attention",
        BACKEND,
        "if not module.training or q_len != kv_len or q_len <= 1 or not causal:",
        "if module.training or q_len != kv_len or q_len <= 1 or not causal:",
        "S2-Attn runs in eval mode and training gets full attention (trl sft would train without S2)",
        "tests/test_training.py::test_plain_trl_sft_with_s2_attention",
        slow=True,
    ),
    _m(
        "ddp-average-tokens-scale-dropped-end-to-end",
        LOSS,
        "loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)",
        "loss = loss",
        "ChunkedLossTrainer drops DDP's average-tokens scale: 2 processes train on half the loss of one",
        "tests/test_training.py::test_two_process_ddp_on_cpu",
        slow=True,
    ),
    # ---- issue #15: S2-Attn under Ulysses sequence parallelism
    _m(
        "ulysses-local-heads-split-as-if-all",
        "hf_longlora/attention/ulysses.py",
        'kwargs["global_heads"] = (rank * local, local * world)',
        'kwargs["global_heads"] = (0, local)',
        "each rank shifts the second half of its own heads instead of the model's last H // 2 heads",
        "tests/test_ulysses.py",
        slow=True,
    ),
    _m(
        "ulysses-documents-from-positions-ignored",
        BACKEND,
        "documents_from_positions=global_heads is not None",
        "documents_from_positions=False",
        "under sequence parallelism the gathered position_ids are ignored: packed documents attend across",
        "tests/test_ulysses.py::test_local_heads_equal_the_whole_attention",
    ),
    _m(
        "ulysses-split-heads-local-boundary",
        "hf_longlora/attention/groups.py",
        "boundary = total - total // 2  # the first shifted head, globally",
        "boundary = total // 2  # the first shifted head, globally",
        "the shifted half starts at H // 2 instead of H - H // 2 (odd head counts)",
        "tests/test_ulysses.py::test_split_heads_by_global_index",
        "tests/test_ulysses.py::test_local_heads_equal_the_whole_attention",
    ),
    _m(
        "ulysses-trainer-loss-share-not-scaled",
        "hf_longlora/training/sequence_parallel.py",
        "        return loss * self.sequence_parallel_size",
        "        return loss",
        "the trainer's sequence-parallel loss is not scaled by sp: DDP's mean halves the gradient and the logged loss",
        "tests/test_ulysses.py::test_train_cli_with_sequence_parallel_size_2_equals_one_process",
        slow=True,
    ),
    _m(
        "ulysses-sft-padding-continues-the-last-record",
        "hf_longlora/training/sequence_parallel.py",
        "[positions, torch.arange(pad, dtype=positions.dtype).expand(rows, pad)], dim=1",
        "[positions, positions[:, -1:] + 1 + torch.arange(pad).expand(rows, pad)], dim=1",
        "the SFT collator's padding to a multiple of sp continues the last record (its S2 groups change)",
        "tests/test_ulysses.py::test_sft_cli_with_sequence_parallel_size_2_equals_one_process",
        slow=True,
    ),
    _m(
        "ulysses-padding-continues-the-last-document",
        "hf_longlora/training/sequence_parallel.py",
        "[position_ids, torch.arange(pad, dtype=position_ids.dtype).expand(rows, pad)], dim=1",
        "[position_ids, position_ids[:, -1:] + 1 + torch.arange(pad).expand(rows, pad)], dim=1",
        "the padding to a multiple of sp continues the last document (its S2 groups change)",
        "tests/test_ulysses.py::test_a_length_that_does_not_divide_is_padded_with_a_document_of_its_own",
    ),
    # ---- issue #14
    _m(
        "no-shift-keeps-the-shift",
        "hf_longlora/attention/groups.py",
        """        elif shift == "none":
            shifted += unshifted_segment_lengths(length, group)""",
        """        elif shift == "none":
            shifted += shifted_segment_lengths(length, group)""",
        's2_shift="none" still shifts the second head half',
        "tests/test_attention_parity.py::test_no_shift_keeps_every_head_inside_its_group",
    ),
    _m(
        "passkey-documents-without-the-answer",
        "hf_longlora/data/passkey.py",
        'documents.append(f"{prompt} {key}.")',
        "documents.append(prompt)",
        "the passkey training documents end at the question (nothing to learn retrieval from)",
        "tests/test_tokenizer_data.py::test_passkey_documents_hide_one_key_and_answer_it",
    ),
    _m(
        "passkey-documents-ignore-the-haystacks",
        "hf_longlora/data/passkey.py",
        "if hay_ids and rng.random() < haystack_fraction:",
        "if False:",
        "the passkey training documents never hide the needle in prose",
        "tests/test_tokenizer_data.py::test_passkey_documents_hide_one_key_and_answer_it",
    ),
    _m(
        "bf16-copies-not-upcast",
        "hf_longlora/adapters/lifecycle.py",
        """        upcast_trained_copies(peft_model, adapter_name)
    use_lean_norms""",
        """        pass
    use_lean_norms""",
        "get_longlora_model leaves a bf16 model's trained embedding and norm copies in bf16 (the norms never move)",
        "tests/test_precision.py::test_norms_and_embeddings_train_at_a_small_learning_rate",
    ),
    _m(
        "upcast-copies-without-the-output-cast",
        "hf_longlora/adapters/precision.py",
        "        trained.register_forward_hook(_outputs_to_base_dtype)",
        "        pass",
        "the fp32 copies hand fp32 to a bf16 model (the residual stream and its memory turn fp32)",
        "tests/test_precision.py::test_the_forward_is_unchanged_and_stays_bf16",
    ),
    _m(
        "upcast-copies-force-fp32-inputs",
        "hf_longlora/adapters/precision.py",
        "    return args if weight is None else _cast_floating(args, weight.dtype)",
        "    return _cast_floating(args, torch.float32)",
        "a copy cast to bf16 afterwards (DeepSpeed's bf16 mode) gets fp32 inputs",
        "tests/test_precision.py::test_a_model_cast_to_bf16_afterwards_still_runs",
    ),
    _m(
        "chunked-loss-outside-autocast",
        "hf_longlora/training/loss.py",
        "        with self.accelerator.autocast():",
        "        if True:",
        "ChunkedLossTrainer's loss runs outside the accelerator's autocast",
        "tests/test_loss.py::test_trainer_runs_the_chunked_loss_under_its_mixed_precision",
    ),
    _m(
        "fused-loss-fp32-hidden-bf16-head",
        "hf_longlora/training/loss.py",
        "        elif hidden.dtype == torch.float32 and weight.dtype in (torch.bfloat16, torch.float16):",
        "        elif False:",
        "fp32 hidden states next to a bf16 head multiply in fp32 against a bf16 weight (a dtype error)",
        "tests/test_loss.py::test_fused_with_a_bf16_head_and_fp32_hidden_states_outside_autocast",
    ),
    _m(
        "lean-norm-without-the-mean-term",
        "hf_longlora/adapters/norms.py",
        "grad_x = (rstd * (g_n - n * (g_n * n).mean(-1, keepdim=True))).to(x.dtype)",
        "grad_x = (rstd * g_n).to(x.dtype)",
        "the lean RMSNorm's input gradient drops the term through rstd",
        "tests/test_norms.py",
    ),
    _m(
        "lean-norm-gemma-without-the-offset",
        "hf_longlora/adapters/norms.py",
        "g_n = g * _scale(weight, layout).float()",
        "g_n = g * weight.float()",
        "the lean RMSNorm's backward forgets Gemma's 1 + w",
        "tests/test_norms.py",
    ),
    _m(
        "lean-norm-llama-without-the-rounding",
        "hf_longlora/adapters/norms.py",
        "return weight * n.to(input_dtype)",
        "return weight * n",
        "the lean RMSNorm's llama layout skips the cast before the weight (no longer bit-identical)",
        "tests/test_norms.py",
    ),
    _m(
        "lean-norm-saves-the-normalised-input",
        "hf_longlora/adapters/norms.py",
        "ctx.save_for_backward(x, weight, rstd)",
        "ctx.save_for_backward(x, weight, rstd, x.float() * rstd)\n        ctx.saved_n = True",
        "the lean RMSNorm saves the fp32 normalised input as well (the memory it exists to save)",
        "tests/test_norms.py::test_lean_norm_saves_the_input_and_one_value_per_token",
    ),
    _m(
        "lean-norms-not-installed",
        LIFECYCLE,
        "    use_lean_norms(peft_model, adapter_name)  # the same",
        "    pass  # the same",
        "get_longlora_model keeps the trained norms' own forward",
        "tests/test_norms.py",
    ),
    _m(
        "fused-loss-cast-parts-offset",
        LOSS,
        "g_part = g[:, a - v0 : b - v0]",
        "g_part = g[:, a:b]",
        "the fused loss takes a cast part's gradient columns from the wrong offset",
        "tests/test_loss.py",
    ),
    _m(
        "fused-loss-cast-parts-fill-rows",
        LOSS,
        "logits[:, a:b] = F.linear(h, *head_slice(a, b))",
        "logits[:, a:b] = F.linear(h, *head_slice(v0, v0 + b - a))",
        "the fused loss fills a part's logits from the slice's first rows",
        "tests/test_loss.py",
    ),
    _m(
        "fused-loss-slice-view-kept",
        LOSS,
        "del g, g_part  # the view",
        "del g  # the view",
        "the fused loss keeps a view of the last slice's gradient alive into the next chunk's logits",
        "tests/test_loss.py::test_fused_loss_holds_one_chunk_and_one_slice_at_a_time",
    ),
    _m(
        "fused-loss-no-cast-parts",
        LOSS,
        "part = _CAST_SLICE if (weight.dtype != product_dtype or need_weight) else step",
        "part = step",
        "the fused loss casts a trained head's whole vocabulary slice at once",
        "tests/test_loss.py::test_fused_loss_holds_one_chunk_and_one_slice_at_a_time",
    ),
]


def check_snippet(mutation: Mutation, root: Path = ROOT) -> str:
    """The source of the mutation's file; raises SystemExit unless the snippet occurs exactly once."""
    path = root / mutation.file
    text = path.read_text(encoding="utf-8")
    count = text.count(mutation.original)
    if count != 1:
        raise SystemExit(
            f"mutation {mutation.name}: the snippet occurs {count} times in {mutation.file} (must be once):\n"
            f"{mutation.original}"
        )
    if mutation.replacement == mutation.original:
        raise SystemExit(f"mutation {mutation.name}: the replacement equals the original")
    return text


def make_copy(mutation: Mutation | None) -> Path:
    """A temporary directory holding hf_longlora/, tests/, examples/ and pyproject.toml, with the mutation applied."""
    workdir = Path(tempfile.mkdtemp(prefix="hf_longlora_mutant_"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "hf_longlora", workdir / "hf_longlora", ignore=ignore)
    shutil.copytree(ROOT / "tests", workdir / "tests", ignore=ignore)
    shutil.copytree(ROOT / "examples", workdir / "examples", ignore=ignore)  # accelerate configs of the tests
    shutil.copy2(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    if mutation is not None:
        try:  # the sources can change under a long run (someone editing): no copy left behind then
            text = check_snippet(mutation, workdir)
        except SystemExit:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        (workdir / mutation.file).write_text(
            text.replace(mutation.original, mutation.replacement), encoding="utf-8"
        )
    return workdir


def environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(workdir) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_copy(workdir: Path, env: dict[str, str]) -> None:
    """Python started in the copy must import the copy's hf_longlora, not the editable install's."""
    result = subprocess.run(
        [sys.executable, "-c", "import hf_longlora; print(hf_longlora.__file__)"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    where = result.stdout.strip()
    expected = workdir / "hf_longlora" / "__init__.py"
    if result.returncode != 0 or Path(where).resolve() != expected.resolve():
        raise SystemExit(f"the copy in {workdir} imports hf_longlora from {where!r}: {result.stderr[-2000:]}")


def run_pytest(workdir: Path, tests: tuple[str, ...], slow: bool) -> tuple[int, str]:
    env = environment(workdir)
    check_imports_copy(workdir, env)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    command += ["-m", "" if slow else "not slow", *tests]
    try:
        result = subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        return -1, f"timed out after {TIMEOUT_S} s\n{exc.stdout or ''}"
    return result.returncode, result.stdout + result.stderr


def first_failure(output: str) -> str:
    """The first ``FAILED``/``ERROR`` line of pytest's short summary, without the message."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0].split(" ", 1)[1]
    return ""


def run_mutation(mutation: Mutation) -> tuple[str, float, str, str]:
    """(verdict, seconds, killing test, pytest output) of one mutation."""
    start = time.monotonic()
    workdir = make_copy(mutation)
    try:
        code, output = run_pytest(workdir, mutation.tests, mutation.slow)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - start
    if code == FAILED:
        return "killed", seconds, first_failure(output), output
    if code == PASSED:
        return "SURVIVED", seconds, "", output
    return f"ERROR({code})", seconds, "", output


def baseline(mutations: list[Mutation]) -> None:
    """The selected tests pass on the unmutated copy (else a 'kill' would mean nothing)."""
    for slow in (False, True):
        tests = tuple(dict.fromkeys(t for m in mutations if m.slow == slow for t in m.tests))
        if not tests:
            continue
        workdir = make_copy(None)
        try:
            code, output = run_pytest(workdir, tests, slow)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if code != PASSED:
            print(output[-6000:])
            raise SystemExit(
                f"baseline: the unmutated tests fail (pytest exit code {code}): {' '.join(tests)}"
            )
        print(f"baseline: {len(tests)} test selections pass unmutated")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        metavar="SUBSTRING",
        action="append",
        help="run the mutations whose name contains SUBSTRING (repeatable: any of them)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the mutations (snippets checked), run nothing"
    )
    parser.add_argument("--baseline", action="store_true", help="first run the selected tests unmutated")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output of each survivor")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"duplicate mutation names: {sorted(duplicates)}")
    selected = [m for m in MUTATIONS if args.only is None or any(part in m.name for part in args.only)]
    if not selected:
        raise SystemExit(f"no mutation name contains any of {args.only!r}")
    for mutation in selected:
        check_snippet(mutation)
    if args.list:
        for mutation in selected:
            slow = "  [-m '']" if mutation.slow else ""
            print(f"{mutation.name:42} {mutation.file}: {mutation.description}{slow}")
            print(f"{'':42} tests: {' '.join(mutation.tests)}")
        print(f"{len(selected)} mutations, every snippet found exactly once")
        return 0
    if args.baseline:
        baseline(selected)

    rows = []
    total_start = time.monotonic()
    for i, mutation in enumerate(selected, 1):
        verdict, seconds, killer, output = run_mutation(mutation)
        rows.append((mutation, verdict, seconds, killer))
        print(f"[{i}/{len(selected)}] {mutation.name}: {verdict} ({seconds:.1f} s) {killer}", flush=True)
        if verdict != "killed" and (args.verbose or verdict.startswith("ERROR")):
            print(output[-4000:])
    total = time.monotonic() - total_start

    width = max(len(m.name) for m, *_ in rows)
    print()
    print(f"{'mutation':{width}}  {'result':9}  {'seconds':>7}  killed by")
    print(f"{'-' * width}  {'-' * 9}  {'-' * 7}  {'-' * 9}")
    for mutation, verdict, seconds, killer in rows:
        print(f"{mutation.name:{width}}  {verdict:9}  {seconds:7.1f}  {killer}")
    killed = sum(verdict == "killed" for _, verdict, *_ in rows)
    print(f"\n{killed}/{len(rows)} killed in {total:.0f} s")
    survivors = [m.name for m, verdict, *_ in rows if verdict != "killed"]
    if survivors:
        print("not killed: " + ", ".join(survivors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
