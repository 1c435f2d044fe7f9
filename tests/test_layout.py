"""The package's architecture, read from its imports (ast): the arrows that must never exist, and the old module
paths that still import (deprecated) as the very same modules."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_longlora"

# (importers, forbidden targets, why); a prefix ending in "." means every module under it
RULES = [
    ("hf_longlora.attention", ("hf_longlora.",), "the attention backend imports nothing else of ours"),
    ("hf_longlora.data", ("hf_longlora.",), "data imports nothing else of ours"),
    (
        "hf_longlora.adapters",
        ("hf_longlora.training", "hf_longlora.evaluation", "hf_longlora.data"),
        "adapters know no training, evaluation or data",
    ),
    ("hf_longlora.", ("hf_longlora.cli",), "nothing below the CLI imports the CLI"),
]


def under(name: str, prefix: str) -> bool:
    return (
        name.startswith(prefix) if prefix.endswith(".") else name == prefix or name.startswith(prefix + ".")
    )


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, name: str, is_package: bool) -> set[str]:
    """Absolute names of every module imported anywhere in a module (function bodies included)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from . import trl_hook` imports a module too
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """``modules``: name -> (source, is_package). Returns one line per forbidden arrow."""
    from hf_longlora._moved import MOVED_MODULES

    bad = []
    for name, (source, is_package) in sorted(modules.items()):
        reported: list[str] = []
        for target in sorted(imports_of(source, name, is_package)):  # X sorts before X.y
            if any(under(target, r) for r in reported):
                continue  # `from X import y` is reported once, as X
            for importer, forbidden, why in RULES:
                own_package = not importer.endswith(".") and under(target, importer)
                if name == "hf_longlora.cli" or not under(name, importer) or own_package:
                    continue
                if any(under(target, f) for f in forbidden):
                    bad.append(f"{name} imports {target}: {why}")
                    reported.append(target)
            if target in MOVED_MODULES and name != "hf_longlora._moved":
                bad.append(f"{name} imports the deprecated path {target} (use {MOVED_MODULES[target]})")
                reported.append(target)
    return bad


def package_modules() -> dict[str, tuple[str, bool]]:
    return {
        module_name(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
        for p in PACKAGE.rglob("*.py")
    }


def test_no_forbidden_import_arrows():
    modules = package_modules()
    assert {
        "hf_longlora.attention.groups",
        "hf_longlora.adapters.loading",
        "hf_longlora.training.sft",
    } <= set(modules)
    assert violations(modules) == []


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("hf_longlora.attention.backend", "from ..adapters import context", "hf_longlora.adapters"),
        ("hf_longlora.attention.sdpa", "def f():\n    from hf_longlora.training import loss", "training"),
        ("hf_longlora.adapters.merge", "from ..training.loss import causal_lm_loss", "training.loss"),
        ("hf_longlora.adapters.lifecycle", "from ..evaluation import perplexity", "evaluation"),
        ("hf_longlora.training.sft", "from .. import cli", "hf_longlora.cli"),
        ("hf_longlora.evaluation.run", "from ..cli import DTYPES", "hf_longlora.cli"),
        ("hf_longlora.data.passkey", "from ..adapters.smollm2 import resolve_model_path", "adapters"),
        ("hf_longlora.evaluation.models", "from ..offline import resolve_model_path", "deprecated"),
    ],
)
def test_each_rule_catches_its_arrow(name, source, expected):
    """The checker itself: a planted forbidden import is reported (relative, absolute, inside a function)."""
    found = violations({name: (source, False)})
    assert len(found) == 1 and expected in found[0], found


def test_allowed_arrows_are_not_reported():
    allowed = {
        "hf_longlora.attention.backend": ("from .groups import plan_s2\nimport torch", False),
        "hf_longlora.adapters.loading": ("from ..attention import S2_ATTENTION", False),
        "hf_longlora.evaluation.perplexity": ("from ..training.loss import chunked_causal_lm_loss", False),
        "hf_longlora.cli": ("from .training import run_sft", False),
        "hf_longlora.training": ("from .sft import run_sft\nfrom ..adapters import load_model", True),
    }
    assert violations(allowed) == []


def test_old_module_paths_are_the_new_modules_with_a_warning():
    import hf_longlora
    from hf_longlora._moved import MOVED_MODULES

    for old, new in MOVED_MODULES.items():
        assert not (
            PACKAGE / (old.rpartition(".")[2] + ".py")
        ).exists()  # no file left behind: only the alias
        import sys

        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            __import__(old)  # as an import statement does (no importlib.import_module frame)
        assert sys.modules[old] is importlib.import_module(new), old
        messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
        assert any(f"{old} is deprecated" in m and new in m for m in messages), (old, messages)
        assert caught[0].filename == __file__  # the warning points at the importing line, not at importlib
    from hf_longlora.loss import causal_lm_loss  # noqa: F401  (the documented 0.1.0.dev0 spelling)

    assert hf_longlora.training.bf16_supported is hf_longlora.training.recipe.bf16_supported


# ------------------------------------------------------------------------------------------- the API document

API_DOC = PACKAGE.parent / "docs" / "api.md"


def documented_blocks() -> list[str]:
    """The doc's paragraphs and list items (a signature may wrap over lines)."""
    blocks, current = [], []
    for line in API_DOC.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith(("- ", "#")):
            blocks.append(" ".join(current))
            current = []
        if line.strip():
            current.append(line.strip())
    return [*blocks, " ".join(current)]


@pytest.mark.parametrize(
    "module", ["hf_longlora", "hf_longlora.adapters", "hf_longlora.training", "hf_longlora.data"]
)
def test_api_doc_lists_every_public_name_and_argument(module):
    """docs/api.md names every name in each package's __all__, and for each public function or class the line
    that documents it names every one of its arguments."""
    import inspect

    mod = importlib.import_module(module)
    text = API_DOC.read_text(encoding="utf-8")
    names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
    missing, missing_args = [], []
    for name in names:
        if name.startswith("__"):
            continue
        if f"{name}" not in text:
            missing.append(name)
            continue
        obj = getattr(mod, name)
        if not inspect.isfunction(obj):
            continue
        lines = [block for block in documented_blocks() if f"{name}(" in block]
        if not lines:
            missing_args.append(f"{name}: no line shows its signature")
            continue
        params = [p for p in inspect.signature(obj).parameters.values() if p.kind is not p.VAR_KEYWORD]
        documented = " ".join(lines)
        for param in params:
            if param.name == "config" and name == "get_longlora_model":
                continue  # the deprecated alias, documented in prose
            if param.name not in documented:
                missing_args.append(f"{name}({param.name})")
    assert missing == [] and missing_args == [], (missing, missing_args)


def test_reliability_doc_names_tests_that_exist():
    """Every test docs/reliability.md cites exists (a renamed or deleted test makes a row a lie)."""
    import re

    text = (PACKAGE.parent / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("|") and "::" in line]
    assert len(rows) >= 40
    missing = []
    for row in rows:
        current = None
        for file, name in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)", row.split("|")[-2]):
            current = file or current
            source = (PACKAGE.parent / "tests" / current).read_text(encoding="utf-8")
            if f"def {name}(" not in source:
                missing.append(f"{current}::{name}")
    assert missing == []
