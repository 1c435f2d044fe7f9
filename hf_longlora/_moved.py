"""The module paths of 0.1.0.dev0's flat layout, importable for one more release with a DeprecationWarning.

``import hf_longlora.loss`` gives the very module ``hf_longlora.training.loss`` (the same object, so patches and
``isinstance`` checks agree). Nothing in the package imports these paths; the finder is installed on import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED_MODULES = {
    "hf_longlora.adapter": "hf_longlora.adapters.lifecycle",
    "hf_longlora.callbacks": "hf_longlora.training.callbacks",
    "hf_longlora.context": "hf_longlora.adapters.context",
    "hf_longlora.hub": "hf_longlora.adapters.hub",
    "hf_longlora.loading": "hf_longlora.adapters.loading",
    "hf_longlora.loss": "hf_longlora.training.loss",
    "hf_longlora.merge": "hf_longlora.adapters.merge",
    "hf_longlora.offline": "hf_longlora.adapters.smollm2",
    "hf_longlora.peft_config": "hf_longlora.adapters.config",
    "hf_longlora.trl_hook": "hf_longlora.training.trl_hook",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to its new module."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} is deprecated and will be removed after 0.1: import {new} instead",
            DeprecationWarning,
            stacklevel=2,  # warnings skips importlib's frames: this points at the import statement
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:  # the new module is already executed
        return None


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
