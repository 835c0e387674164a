"""The base of the settings objects of the public entry points (the pattern of :class:`flipfrag.flip.FlipOptions`).

An entry point with many settings takes its data as arguments and its settings as one frozen dataclass,
``f(data, ..., options=None, **overrides)``: keywords are overrides of ``options`` (default: the class's defaults),
so ``f(x, options=Opts(lr=0.1))`` and ``f(x, lr=0.1)`` are the same call. Each subclass checks its fields in
``__post_init__``, so a bad value is refused when the object is made, with an error naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Options"]

_O = TypeVar("_O", bound="Options")


@dataclass(frozen=True)
class Options:
    """A frozen, validated set of settings; subclasses are dataclasses (``@dataclass(frozen=True)``)."""

    def replace(self: _O, **overrides: Any) -> _O:
        """A copy with ``overrides`` (validated again); an unknown name is a TypeError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the {type(self).__name__} fields are "
                            f"{sorted(known)}")  # fmt: skip
        return dataclasses.replace(self, **overrides) if overrides else self

    @classmethod
    def resolve(cls: type[_O], options: _O | None, overrides: dict[str, Any]) -> _O:
        """``options`` (default ``cls()``, or ``cls(**overrides)`` when the class has required fields) with
        ``overrides``: what an entry point's ``options=None, **overrides`` mean."""
        if options is None:
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise TypeError(f"unexpected keyword argument(s) {unknown}; the {cls.__name__} fields are "
                                f"{sorted(known)}")  # fmt: skip
            return cls(**overrides)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__} or None, got {type(options).__name__}")
        return options.replace(**overrides)
