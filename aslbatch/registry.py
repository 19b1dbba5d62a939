"""Lazy registries: a name mapped to where its class lives, imported on first use.

The model and estimator registries are the only place where their names are written;
the command line, the batch, evaluation, benchmarks and the output tables all read
them. Listing names (``list(registry)``, ``name in registry``) imports nothing, so
``aslbatch --help`` and an LM run never import scikit-learn.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping, Generic[T]):
    """Read-only ``{name: class}`` whose classes are imported when first looked up.

    ``what``: the kind of entry, for error messages ("model", "method"); ``entries``:
    ``{name: "package.module:ClassName"}`` in the order the names are offered to users.
    """

    def __init__(self, what: str, entries: Mapping[str, str]) -> None:
        self.what = what
        self._entries = dict(entries)
        self._loaded: dict[str, type[T]] = {}

    def __getitem__(self, name: str) -> type[T]:
        if name not in self._loaded:
            try:
                target = self._entries[name]
            except (KeyError, TypeError):
                raise KeyError(name) from None
            module, _, attribute = target.partition(":")
            cls = getattr(import_module(module), attribute)
            if getattr(cls, "name", name) != name:
                raise RuntimeError(f"{target} is registered as {self.what} {name!r} but calls itself {cls.name!r}")
            self._loaded[name] = cls
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get_class(self, name: str) -> type[T]:
        """The class registered as ``name``, or a ValueError listing the known names."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} {name!r}; choose one of {list(self._entries)}")
        return self[name]

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._entries)})"
