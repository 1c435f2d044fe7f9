"""Our own lines and progress bars only: the commands drop known, harmless messages of their dependencies, and
print their own lines once under ``accelerate launch`` (on the main process).

Each dropped message is named here (nothing else is silenced): bitsandbytes' optional-kernel notice on AVX-512 CPUs,
DeepSpeed's accelerator detection note, transformers' deprecation of the ``gradient_checkpointing`` names as PEFT and
TRL still call them, DDP's unused-parameter search note, accelerate's OMP_NUM_THREADS note.
"""

from __future__ import annotations

import logging
import os
import warnings

# (logger name, message prefix) of log records that are dropped
DROPPED_LOG_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("DeepSpeed", "Setting accelerator to CPU"),
)
# (category, message regex) of warnings that are ignored
IGNORED_WARNINGS = (
    (FutureWarning, r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"),
    (UserWarning, r"find_unused_parameters=True was specified in DDP constructor"),
    (UserWarning, r"OMP_NUM_THREADS/MKL_NUM_THREADS unset"),
)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_dependencies() -> None:
    """Install the filters (idempotent). Called by the ``hf-longlora`` command before anything heavy is imported."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix in DROPPED_LOG_RECORDS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(tuple(prefixes)))
    for category, message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def is_main_process() -> bool:
    """Rank 0 under accelerate / torchrun (``RANK``), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """Print one of the command's own lines, once per run (on the main process only)."""
    if is_main_process():
        print(message, flush=True)


def hide_progress_bars() -> None:
    """``--no-progress`` / ``no_progress``: no bar from transformers, datasets or huggingface_hub either."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
