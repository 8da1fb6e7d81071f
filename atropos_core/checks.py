"""Declarative range and choice checks for the config dataclasses.

A field states its rule in its annotation, `steps: Annotated[int, Ge(1)] = 1000`, and the class's
`__post_init__` calls `check_fields(self, "run")` once: every rule of every field is checked and the
first failure raises `ValueError("run.steps must be >= 1, got 0")`, naming `section.field`. A
`Literal[...]` type is a choice rule by itself. None always passes (it is how an Optional field says
"unset"); checks that relate two fields stay as plain code in `__post_init__`. The CLI
(`atropos_core.config`) reads the same annotations to show the choices in --help.
"""
from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["Ge", "Gt", "Between", "OneOf", "Finite", "NonEmpty", "check_fields", "rules_of", "choices_of"]


class Rule:
    """One check of a field's value: `ok(v)`, and `text` completing "section.field ..."."""

    def ok(self, v: Any) -> bool:
        raise NotImplementedError

    @property
    def text(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Ge(Rule):
    lo: float
    ok = lambda self, v: v >= self.lo  # noqa: E731
    text = property(lambda self: f"must be >= {self.lo}")


@dataclass(frozen=True)
class Gt(Rule):
    lo: float
    ok = lambda self, v: v > self.lo  # noqa: E731
    text = property(lambda self: f"must be > {self.lo}")


@dataclass(frozen=True)
class Between(Rule):
    """lo <= v <= hi."""
    lo: float
    hi: float
    ok = lambda self, v: self.lo <= v <= self.hi  # noqa: E731
    text = property(lambda self: f"must be in [{self.lo}, {self.hi}]")


class Finite(Rule):
    ok = staticmethod(lambda v: math.isfinite(v))
    text = "must be a finite number"


class NonEmpty(Rule):
    ok = staticmethod(lambda v: len(v) > 0)
    text = "must not be empty"


class OneOf(Rule):
    """v is one of `values` (given as arguments or as one tuple)."""

    def __init__(self, *values):
        one = len(values) == 1 and isinstance(values[0], (tuple, list, dict))
        self.values = tuple(values[0]) if one else values

    def ok(self, v):
        return v in self.values

    @property
    def text(self):
        return "must be one of " + ", ".join(map(repr, self.values))


def rules_of(tp) -> list[Rule]:
    """The rules an annotation carries: `Annotated` metadata (also inside Optional) and `Literal` choices."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        return rules_of(base) + [m for m in meta if isinstance(m, Rule)]
    if origin in (typing.Union, types.UnionType):
        return [r for a in typing.get_args(tp) if a is not type(None) for r in rules_of(a)]
    if origin is typing.Literal:
        return [OneOf(*typing.get_args(tp))]
    return []


def choices_of(tp) -> tuple | None:
    """The values a choice field accepts (for --help), or None."""
    for r in rules_of(tp):
        if isinstance(r, OneOf):
            return r.values
    return None


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def check_fields(obj, section: str) -> None:
    """Raise ValueError naming `section.field` for the first field of `obj` that breaks its rules."""
    hints = _hints(type(obj))
    for f in fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        for rule in rules_of(hints[f.name]):
            try:
                good = rule.ok(v)
            except TypeError:  # a string where a number belongs (from a config file)
                good = False
            if not good:
                raise ValueError(f"{section}.{f.name} {rule.text}, got {v!r}")
