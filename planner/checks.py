"""The planner's checks of what it reads: ``require``, and typed readers of stored plan data.

Plan data comes back as JSON (``planner.result``'s ``from_dict``): any value may hold any JSON type.
``json_object`` checks an object's format and keys; the value readers return a field in its Python
type or raise a ValueError naming it. Numbers follow ``sensitivity.checks``: a bool is not an int,
and a float is not an int even when integral.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping
from typing import Any

from sensitivity.checks import is_int, shown

FORMAT_KEY = "format"


def require(condition: bool, message: str) -> None:
    """A ValueError with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)


def json_object(
    data: Any, what: str, keys: Collection[str], form: str | None = None, optional: Collection[str] = ()
) -> dict[str, Any]:
    """``data``'s fields, once it is a JSON object with exactly ``keys`` (besides ``"format": form``
    when ``form`` is given): another format, an unknown key (non-str keys too) and a missing one are
    refused, so a document written by another version is never half read. ``optional`` keys (added
    after documents were stored) may be missing: they read as None."""
    require(isinstance(data, Mapping), f"{what} must be a JSON object; got {type(data).__name__}")
    if form is not None:
        found = data.get(FORMAT_KEY)
        require(found == form, f"{what} of format {shown(found)} cannot be read: this version reads {form!r}")
    allowed = {*keys, *optional, FORMAT_KEY} if form is not None else {*keys, *optional}
    unknown = sorted(str(key) for key in data if key not in allowed)
    require(not unknown, f"unknown keys {shown(unknown)} in {what}; known: {sorted({*keys, *optional})}")
    missing = sorted(key for key in keys if key not in data)
    require(not missing, f"{what} lacks the keys {missing}")
    return {key: data.get(key) for key in (*keys, *optional)}


def real(what: str, value: Any) -> float:
    """A JSON number (an int or a float, not a bool) as a float."""
    require(
        isinstance(value, numbers.Real) and not isinstance(value, bool), f"{what} must be a number; got {shown(value)}"
    )
    return float(value)


def integer(what: str, value: Any) -> int:
    require(is_int(value), f"{what} must be an integer; got {shown(value)}")
    return int(value)


def text(what: str, value: Any) -> str:
    require(isinstance(value, str), f"{what} must be a string; got {shown(value)}")
    return str(value)


def flag(what: str, value: Any) -> bool:
    require(isinstance(value, bool), f"{what} must be true or false; got {shown(value)}")
    return bool(value)


def mapping(what: str, value: Any) -> dict[str, Any]:
    """A JSON object with string keys, its values as they are."""
    require(
        isinstance(value, Mapping) and all(isinstance(key, str) for key in value),
        f"{what} must be a JSON object; got {shown(value)}",
    )
    return dict(value)


def json_list(what: str, value: Any) -> list[Any]:
    require(isinstance(value, list | tuple), f"{what} must be a list; got {shown(value)}")
    return list(value)


def texts(what: str, value: Any) -> tuple[str, ...]:
    return tuple(text(f"{what}[{index}]", item) for index, item in enumerate(json_list(what, value)))


def text_mapping(what: str, value: Any) -> dict[str, str]:
    """A JSON object of strings (a configuration, versions)."""
    return {key: text(f"{what}[{key!r}]", item) for key, item in mapping(what, value).items()}


def real_mapping(what: str, value: Any) -> dict[str, float]:
    """A JSON object of numbers (timings)."""
    return {key: real(f"{what}[{key!r}]", item) for key, item in mapping(what, value).items()}
