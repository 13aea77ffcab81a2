"""The building blocks of recipe validation: every section's fields are checked with these.

Each helper takes the dotted field name (``stochastic_depth.p_L``) so that every error points at
the exact place in the YAML and says what is allowed (:class:`~retrofit.errors.RecipeError`).
A technique's spec (``retrofit/techniques/``) is a frozen dataclass deriving from :class:`Spec`
whose ``from_dict`` validates its section with them; ``retrofit/recipe.py`` assembles the recipe.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, ClassVar

from retrofit.errors import RecipeError

__all__ = [
    "INT64_MAX",
    "Spec",
    "boolean",
    "check_keys",
    "choice",
    "did_you_mean",
    "dotted",
    "integer",
    "number",
    "numeric_string",
    "section_body",
]


def did_you_mean(key: str, allowed: list[str] | tuple[str, ...]) -> str | None:
    """A 'did you mean' hint: case-insensitive match first (p_l → p_L), then difflib."""
    for candidate in allowed:
        if candidate.lower() == key.lower():
            return f"did you mean '{candidate}'?"
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def check_keys(
    section: str,
    data: Mapping[str, Any],
    allowed: list[str] | tuple[str, ...],
    hint: Callable[[str], str | None] | None = None,
) -> None:
    """Refuse a key that is not ``allowed``, with a did-you-mean (or ``hint(key)``)."""
    for key in data:
        if not isinstance(key, str):
            raise RecipeError(dotted(section, str(key)), key, f"string keys: {', '.join(allowed)}")
        if key not in allowed:
            raise RecipeError(
                dotted(section, key),
                data[key],
                f"keys {', '.join(allowed)}" if section else f"sections {', '.join(allowed)}",
                did_you_mean(key, allowed) or (hint(key) if hint is not None else None),
            )


def dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def numeric_string(value: object) -> float | None:
    """The number in a string like "1e-1", else None.

    PyYAML implements YAML 1.1, which reads an exponent without a dot ("1e-1") as a string. The
    trainer's ``train:`` section accepts such strings for its float fields, and so do the other
    sections, so one rule holds for every number in a recipe.
    """
    if not isinstance(value, str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def number(
    field: str,
    value: object,
    *,
    low: float,
    high: float,
    low_open: bool = True,
    high_open: bool = False,
) -> float:
    """A float in an interval; ints are accepted, bools are not (True is not the number 1 here)."""
    lo_br, hi_br = ("(" if low_open else "["), (")" if high_open else "]")
    allowed = f"a number in {lo_br}{low:g}, {high:g}{hi_br}"
    number = numeric_string(value)
    if number is not None:
        value = number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(field, value, allowed)
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        raise RecipeError(field, value, allowed) from None
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if not math.isfinite(v) or too_low or too_high:
        raise RecipeError(field, value, allowed)
    return v


# Integers end up in torch/numpy int64 (seeds, sizes, counts): nothing larger is meaningful.
INT64_MAX = 2**63 - 1


def integer(field: str, value: object, *, low: int) -> int:
    """An int in [low, 2**63-1]. Floats are rejected even when whole: 7.0 for a block size is a
    typo."""
    allowed = f"an integer in [{low}, 2**63-1]"
    if isinstance(value, bool) or not isinstance(value, int):
        hint = None
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            hint = f"write {int(value)} without quotes"
        raise RecipeError(field, value, allowed, hint)
    if not low <= value <= INT64_MAX:
        raise RecipeError(field, value, allowed)
    return value


def choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    allowed = " | ".join(choices)
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else None
        raise RecipeError(field, value, allowed, hint)
    return value


def boolean(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(field, value, "true | false")
    return value


def section_body(section: str, value: object) -> dict[str, Any] | None:
    """The body of a section: a mapping, or None/true for the defaults; false disables it."""
    if value is None or value is True:
        return {}
    if value is False:
        return None
    if not isinstance(value, Mapping):
        raise RecipeError(
            section,
            value,
            "a mapping of its fields, empty for the defaults, or false to disable it",
        )
    return dict(value)


class Spec:
    """Shared to_dict / field listing for the section dataclasses."""

    section: ClassVar[str]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def parse(cls, value: object) -> Any:
        """The recipe's ``<section>:`` value → this spec: a mapping (empty or bare for the
        defaults), or None when the section is false (disabled)."""
        body = section_body(cls.section, value)
        return None if body is None else cls.from_dict(body)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """Resolved values, ready for JSON/YAML (tuples become lists)."""
        out: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out
