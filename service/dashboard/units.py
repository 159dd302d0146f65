"""One unit per cost column of a plan page, shared by its chart and its tables.

A column whose rows each pick their own unit (103.2 KiB beside 1.2 MiB) cannot be compared at a
glance, nor against the chart's axis; the plan page therefore picks one unit per figure from the
largest value it shows, writes it in the column header and the axis title, and the script divides
the chart's values by the same ``per``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

# (name after a value, column header and axis title, base units per one): sizes in binary multiples
# as the download sizes are shown; BOPS in powers of ten written out (a "G" prefix would read as the
# inter-layer matrix G on these pages).
Units = tuple[tuple[str, str, float], ...]
SIZE_UNITS: Units = (
    ("bytes", "Size (bytes)", 1.0),
    ("KiB", "Size (KiB)", 1024.0),
    ("MiB", "Size (MiB)", 1024.0**2),
    ("GiB", "Size (GiB)", 1024.0**3),
)
BOPS_UNITS: Units = (
    ("BOPS", "BOPS", 1.0),
    ("×10³ BOPS", "BOPS (×10³)", 1e3),
    ("×10⁶ BOPS", "BOPS (×10⁶)", 1e6),
    ("×10⁹ BOPS", "BOPS (×10⁹)", 1e9),
    ("×10¹² BOPS", "BOPS (×10¹²)", 1e12),
)
LATENCY_UNITS: Units = (("ms", "Latency, mean (ms)", 1.0),)
# The accuracy-latency chart's x axis: the median, which the ratio to float is taken on too.
LATENCY_P50_UNITS: Units = (("ms", "Latency, p50 (ms)", 1.0),)


@dataclass(frozen=True)
class Unit:
    """What a column's numbers are in: value shown = value stored / per."""

    name: str  # after a value: "13.4 KiB"
    label: str  # the column header and the axis title: "Size (KiB)"
    per: float

    def of(self, value: float | None) -> float | None:
        return None if value is None else value / self.per

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unit_for(values: Iterable[float | None], units: Units) -> Unit:
    """The largest unit not above the largest magnitude among ``values`` (the smallest unit when none)."""
    largest = max((abs(v) for v in values if v is not None), default=0.0)
    return Unit(*next((unit for unit in reversed(units) if unit[2] <= largest), units[0]))


def cost_units(rows: Iterable[dict[str, Any]]) -> dict[str, Unit]:
    """The unit of each cost figure (size_bytes, bops, latency_ms, latency_p50_ms) over the rows a plan page shows."""
    listed = list(rows)
    return {
        "size_bytes": unit_for((r.get("size_bytes") for r in listed), SIZE_UNITS),
        "bops": unit_for((r.get("bops") for r in listed), BOPS_UNITS),
        "latency_ms": unit_for((r.get("latency_ms") for r in listed), LATENCY_UNITS),
        "latency_p50_ms": unit_for((r.get("latency_p50_ms") for r in listed), LATENCY_P50_UNITS),
    }
