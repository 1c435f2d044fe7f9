"""Opt-in registration of ``s2_attention`` in processes hf_longlora does not start itself (``trl sft``).

``trl sft --config x.yaml`` re-launches TRL's own script through ``accelerate launch`` in a child process that never
imports hf_longlora, so ``attn_implementation: s2_attention`` fails there with "not supported". The hook is a
one-line ``.pth`` file in site-packages; Python runs it at every start, and it imports hf_longlora (which registers
the backend) only when ``HF_LONGLORA_REGISTER=1`` is set. TRL's YAML turns its ``env:`` block into environment
variables of the child, so a config opts in with::

    env:
      HF_LONGLORA_REGISTER: "1"
    attn_implementation: s2_attention

Install once per environment with ``hf-longlora trl-hook install`` (``remove`` undoes it, ``status`` tells).
Without the variable the hook costs one dictionary lookup at start-up and imports nothing.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

ENV_VAR = "HF_LONGLORA_REGISTER"
PTH_NAME = "hf_longlora_register.pth"
PTH_LINE = f'import os; os.environ.get("{ENV_VAR}") == "1" and __import__("hf_longlora")\n'


def hook_path(site_dir: str | Path | None = None) -> Path:
    return Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME


def install(site_dir: str | Path | None = None) -> Path:
    """Write the ``.pth`` hook into ``site_dir`` (default: this environment's site-packages)."""
    path = hook_path(site_dir)
    path.write_text(PTH_LINE, encoding="utf-8")
    return path


def remove(site_dir: str | Path | None = None) -> bool:
    path = hook_path(site_dir)
    if path.exists():
        path.unlink()
        return True
    return False


def is_installed(site_dir: str | Path | None = None) -> bool:
    path = hook_path(site_dir)
    return path.exists() and path.read_text(encoding="utf-8") == PTH_LINE
