"""A tiny name -> factory registry (backbones, methods, datasets, runtimes, continual methods).

Each backbone / method / dataset / runtime file registers itself with a decorator, so adding
one is a single registration, not an edit across the tree (docs/architecture.md lists the
extension points). ``Registry.get`` turns an unknown name into one line listing the choices;
:func:`lazy_exports` is the lazy ``__getattr__`` every workflow package re-exports its names with.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from repnet.errors import RepnetError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}
        # prefix resolvers, e.g. "timm:" -> callable(rest) -> T
        self._prefixes: dict[str, Callable[[str], T]] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            self._help[name] = help or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            return obj

        return deco

    def register_prefix(self, prefix: str, help: str = "") -> Callable:
        def deco(fn):
            self._prefixes[prefix] = fn
            self._help[prefix + "<name>"] = help or (fn.__doc__ or "").strip().split("\n")[0]
            return fn

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plug-in's or a test's registration)."""
        self._items.pop(name)
        self._help.pop(name, None)

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        for prefix, fn in self._prefixes.items():
            if name.startswith(prefix):
                return fn(name[len(prefix):])
        choices = ", ".join(self.names(with_prefixes=True))
        raise RepnetError(f"unknown {self.kind} '{name}'; choose from: {choices}")

    def __contains__(self, name: str) -> bool:
        return name in self._items or any(name.startswith(p) for p in self._prefixes)

    def names(self, with_prefixes: bool = False) -> list[str]:
        out = list(self._items)
        if with_prefixes:
            out += [p + "<name>" for p in self._prefixes]
        return out

    def help(self, name: str) -> str:
        return self._help.get(name, "")

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``name`` from ``package.<exports[name]>``
    on first use (PEP 562), so a package can re-export its public names without importing (and paying
    for) every module at once."""
    import importlib

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__
