"""Registering ``PREFIX_PLUS`` with PEFT at the moment PEFT is imported, so that the package itself imports light.

``import peft_prefix_plus`` promises that PEFT knows the ``PREFIX_PLUS`` method. No program can look at PEFT's
registry before it has imported ``peft``, so registering when ``peft``'s import completes keeps that promise exactly
(and at once when ``peft`` is already imported), while ``import peft_prefix_plus`` itself, and therefore
``prefix-plus --help``, imports neither torch nor peft.

Registration imports this package's config and model modules. When one of them is what imported ``peft``, it is
still executing at that moment, so registration waits until the outermost module of this package being executed
has finished. A meta path finder wraps the loaders of ``peft`` and of this package's modules to see both events; it
removes itself once registration is done. Only the public `importlib` API is used.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any, Optional

PACKAGE = __name__.rpartition(".")[0]
WATCHED = "peft"


def register_with_peft() -> None:
    """Run `peft_prefix_plus.integration.install`: register ``PREFIX_PLUS`` and make PrefixPlus's other changes to
    PEFT and transformers (idempotent).

    Example:

    ```py
    >>> register_with_peft()
    >>> from peft.utils import PeftType
    >>> PeftType.PREFIX_PLUS
    ```
    """
    from .integration import install

    install()


class _AfterExecLoader(importlib.abc.Loader):
    """Runs a module with its own loader, then tells the watcher; every other attribute is the original loader's."""

    def __init__(self, loader: importlib.abc.Loader, watcher: RegisterWhenPeftIsImported) -> None:
        self._loader = loader
        self._watcher = watcher

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._watcher.depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._watcher.depth -= 1
        self._watcher.register_if_ready()

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class RegisterWhenPeftIsImported(importlib.abc.MetaPathFinder):
    """A meta path finder that calls ``callback`` once ``peft`` is imported and no module of this package is running.

    Args:
        callback (`Callable[[], None]`): What to run once, e.g. :func:`register_with_peft`.

    Example:

    ```py
    >>> RegisterWhenPeftIsImported(register_with_peft).install()
    ```
    """

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._local = threading.local()
        self._lock = threading.Lock()
        self._done = False

    @property
    def depth(self) -> int:
        """How many watched modules this thread is executing (nested)."""
        return getattr(self._local, "depth", 0)

    @depth.setter
    def depth(self, value: int) -> None:
        self._local.depth = value

    def install(self) -> None:
        """Run the callback now if ``peft`` is imported already, else put this finder first on ``sys.meta_path``."""
        if WATCHED in sys.modules:
            self._fire()
        else:
            sys.meta_path.insert(0, self)

    def find_spec(
        self, name: str, path: Optional[Sequence[str]], target: Optional[types.ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        """Find ``peft`` or a module of this package with the other finders, and wrap its loader."""
        if self._done or not (name == WATCHED or name.startswith(f"{PACKAGE}.")):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _AfterExecLoader(spec.loader, self)
                return spec
        return None

    def register_if_ready(self) -> None:
        """Run the callback if ``peft`` is imported and this thread executes no module of this package."""
        if not self._done and self.depth == 0 and WATCHED in sys.modules:
            self._fire()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self._callback()


def register_when_peft_is_imported() -> None:
    """Register ``PREFIX_PLUS`` with PEFT now if ``peft`` is imported, else as soon as it is (see the module doc).

    Called by ``import peft_prefix_plus``.

    Example:

    ```py
    >>> register_when_peft_is_imported()
    ```
    """
    RegisterWhenPeftIsImported(register_with_peft).install()
