"""Lazy re-exports for package ``__init__`` modules (PEP 562): a package lists its public names and the module of
each, and a name's module is imported on first use, so that importing a light module of the package (its options,
its registry) does not load torch."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package`` exporting ``{name: ".module"}``.

    A name must not be the name of one of the package's submodules: once that submodule is imported, Python binds
    the package attribute to the module and ``__getattr__`` is no longer asked.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name], package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__, sorted(exports)
