"""Keep what megatron-core imports but seldom uses off every process's start-up.

``import megatron.core`` imports wandb (its timers and inference context: ~0.4 s) and decorates its
fused functions with ``torch.compile``, which imports torch._dynamo and torch._inductor (~1.2 s), in
every process (each tool, each torchrun rank, each of the test suite's subprocesses) whether or not
it logs to wandb or calls a fused function (on the CPU none is called). Both are deferred, not
removed: wandb is imported at its first attribute access (``--wandb-project`` logs as before), and a
fused function is handed to ``torch.compile`` at its first call, where torch.compile compiles anyway.
:func:`defer_heavy_imports` runs in ``megatron_unix/__init__.py``, before megatron-core is imported.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

FUSER_MODULE = "megatron.core.jit"
"""The module whose ``jit_fuser`` (``torch.compile`` on torch >= 2.2) decorates megatron-core's fused functions."""


def compile_at_first_call(fn: Callable, **options: Any) -> Callable:
    """``torch.compile(fn, **options)``, made at the first call instead of at decoration: the same
    compiled function runs, but a process that never calls ``fn`` never imports the compiler."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return run


class ImportedAtFirstUse:
    """Stands in ``sys.modules`` for module ``name`` until one of its attributes is asked for: then
    imports it (in its own place there) and answers from it. Not a module: what scans sys.modules'
    modules (``inspect.getmodule``, which torch's operator registration calls at import) passes it by;
    ``__spec__`` is the module's own, which ``import`` and ``importlib.util.find_spec`` read."""

    def __init__(self, spec: ModuleSpec) -> None:
        self.__spec__ = spec
        self.__name = spec.name

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name) is self:
            del sys.modules[self.__name]
        return getattr(importlib.import_module(self.__name), attr)


def import_at_first_use(name: str) -> None:
    """Put an :class:`ImportedAtFirstUse` for ``name`` in ``sys.modules``. Not installed (megatron-core's
    ``except ImportError`` path) or already imported: left as it is."""
    spec = None if name in sys.modules else importlib.util.find_spec(name)
    if spec is not None:
        sys.modules[name] = ImportedAtFirstUse(spec)  # type: ignore[assignment]


class _DeferFuser:
    """Finds ``megatron.core.jit`` as Python would, and once it has run, swaps its ``jit_fuser`` from
    ``torch.compile`` to :func:`compile_at_first_call` (the fused modules import it afterwards)."""

    @classmethod
    def find_spec(cls, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None):
        if fullname != FUSER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            if module.jit_fuser is sys.modules["torch"].compile:
                module.jit_fuser = compile_at_first_call

        spec.loader.exec_module = exec_module
        return spec


def defer_heavy_imports() -> None:
    """Install both deferrals; call before megatron-core is imported (a no-op for what already is)."""
    import_at_first_use("wandb")
    if FUSER_MODULE not in sys.modules and _DeferFuser not in sys.meta_path:
        sys.meta_path.insert(0, _DeferFuser)
