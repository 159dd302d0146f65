"""Checks of the option values users give to configurations (``sensitivity.results``, ``planner.plan``).

Options arrive from JSON (API bodies, stored requests) and the CLI, so any field may hold None, a
bool, an int of any size, a float (inf and nan included), a string, a list or a dict. Each check
returns the value in its canonical type or raises a ValueError that names the field and says what
it accepts; none raises anything else (no TypeError, no OverflowError from float(10**400)).

Integers must be ints: a bool (an int subclass in Python) and a float are refused, even an
integral float such as 256.0. JSON clients write ints for ints; accepting 1e9 as a probe count
would hide the mistake of a client that computes it in floating point, and refusing keeps one
spelling of every stored value.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Collection
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlevel = 40, 40, 24, 2


def shown(value: Any) -> str:
    """A short repr of a user's value for an error message: never megabytes, never failing."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str conversion limit
        return f"an {type(value).__name__} too large to print"


def _fail(name: str, expected: str, value: Any) -> None:
    raise ValueError(f"{name} must be {expected}; got {shown(value)}")


def is_int(value: Any) -> bool:
    """An int (numpy's too) but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in [low, high] (numpy ints are accepted and become ints)."""
    if not (is_int(value) and low <= value <= high):
        _fail(name, f"an integer in [{low}, {high}]", value)
    return int(value)


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] ((low, high] with ``low_open``); ints are accepted.

    The bounds are compared before converting: ints compare with floats exactly, nan fails every
    comparison and inf fails the (finite) upper bound, so float() never sees an overflowing int.
    """
    numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (numeric and (low < value if low_open else low <= value) and value <= high):
        _fail(name, f"a finite number in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}]", value)
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    if not (isinstance(value, str) and value in choices):
        _fail(name, f"one of {tuple(choices)}", value)
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(name, "true or false", value)
    return value


def set_fields(instance: Any, **values: Any) -> None:
    """Store checked (canonical) values on a frozen dataclass from its ``__post_init__``."""
    for name, value in values.items():
        object.__setattr__(instance, name, value)
