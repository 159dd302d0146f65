"""The planner's checks of what it reads."""

from __future__ import annotations


def require(condition: bool, message: str) -> None:
    """A ValueError with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)
