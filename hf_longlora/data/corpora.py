"""Long documents that need no download: files, JSON lines, and the CPython standard library."""

from __future__ import annotations

import importlib.util
import json
import sysconfig
from collections.abc import Iterable
from pathlib import Path


def pydoc_topics_text() -> str:
    """About 750k characters of English prose about Python that ships with every CPython: ``pydoc_data/topics.py``."""
    spec = importlib.util.find_spec("pydoc_data")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("this Python has no pydoc_data package")
    return (Path(spec.origin).parent / "topics.py").read_text(encoding="utf-8")


def stdlib_documents(min_chars: int = 32_000, limit: int | None = None) -> list[str]:
    """The CPython standard library's longest source files (present on every machine; 274 are over 32k characters).

    Sorted by path, so the selection is deterministic.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= min_chars:
            docs.append(text)
            if limit is not None and len(docs) >= limit:
                break
    return docs


def read_text_corpus(paths: Iterable[str | Path], text_field: str = "text") -> list[str]:
    """Documents from files: ``.txt``/``.md``/``.py`` (one document per file) or ``.jsonl`` (one per line).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a JSON line is invalid or lacks ``text_field``; the corpus is empty.
    """
    docs: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix == ".jsonl":
                for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{file}:{number}: invalid JSON ({exc})") from exc
                    if text_field not in record:
                        raise ValueError(
                            f"{file}:{number}: record has no {text_field!r} field (keys: {sorted(record)})"
                        )
                    docs.append(str(record[text_field]))
            else:
                docs.append(file.read_text(encoding="utf-8"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError("the corpus is empty")
    return docs
