"""``import hf_longlora`` registers ``s2_attention`` with transformers without importing torch itself.

transformers' attention registry lives in ``transformers.modeling_utils``, which imports torch (2-4 s). So that the
``hf-longlora`` command answers ``--help`` at once, registration happens as soon as that module exists: now, if it
is already imported; else right after it is (a post-import hook on that one module name), which is before any
model can be built, loaded or switched with ``set_attn_implementation``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TRIGGER = "transformers.modeling_utils"


BACKEND = "hf_longlora.attention.backend"


def _register() -> None:
    backend = sys.modules.get(BACKEND)
    if backend is not None and not hasattr(backend, "register_s2_attention"):
        return  # the backend's own import loaded transformers: it registers itself when it finishes
    from .attention.backend import register_s2_attention

    register_s2_attention()


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps the real loader of ``TRIGGER``: executes the module, then registers the backend."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register()


class RegisterOnTransformersImport(importlib.abc.MetaPathFinder):
    """Finds ``TRIGGER`` through the other finders and hands back its spec with the wrapping loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)  # once: the module is imported once per process
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' modeling code is loaded, else as soon as it loads."""
    if TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, RegisterOnTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterOnTransformersImport())
