"""What the browser tests read off a rendered dashboard page: its width, its main navigation, and a
plotly chart's figure (``gd.data`` and ``gd.layout``) with the boxes its labels occupy on screen.

Plain functions over a Playwright page, shared by the tests in test_dashboard.py.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Box = tuple[float, float, float, float]  # left, top, right, bottom in CSS pixels

# Elements that end right of the viewport and do not sit in a .scroll box (which clips them and
# scrolls on its own): the names of the first few say what widened a page.
WIDTH_JS = """() => {
  const inner = window.innerWidth;
  const sticking = [...document.querySelectorAll("body *")]
    .filter((e) => e.getBoundingClientRect().right > inner + 0.5 && !e.closest(".scroll"))
    .slice(0, 5).map((e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + (e.className ? "." + e.className : ""));
  return { scroll: document.documentElement.scrollWidth, inner, sticking };
}"""

FIGURE_JS = """(id) => {
  const gd = document.getElementById(id);
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const axis = (a) => ({ type: a.type, range: a.range, title: a.title && a.title.text, tickvals: a.tickvals || null });
  const labelled = (selector) => [...gd.querySelectorAll(selector)].map((e) => ({ text: e.textContent, box: box(e) }));
  return {
    data: gd.data.map((t) => ({ name: t.name, type: t.type, x: t.x, y: t.y, error_y: t.error_y || null,
                                showlegend: t.showlegend !== false, hovertemplate: t.hovertemplate || "" })),
    xaxis: axis(gd.layout.xaxis), yaxis: axis(gd.layout.yaxis),
    xticks: [...gd.querySelectorAll(".xtick text")].map((e) => e.textContent),
    yticks: [...gd.querySelectorAll(".ytick text")].map((e) => e.textContent),
    annotations: labelled(".annotation"), legend: labelled(".legend .traces"),
    markers: [...gd.querySelectorAll(".scatterlayer path.point")].map(box),
    marker_texts: gd.querySelectorAll(".textpoint").length, chart: box(gd),
  };
}"""


@dataclass(frozen=True)
class Label:
    text: str
    box: Box


@dataclass(frozen=True)
class Figure:
    """A plotly chart as the page drew it."""

    data: list[dict[str, Any]]
    xaxis: dict[str, Any]
    yaxis: dict[str, Any]
    xticks: list[str]
    yticks: list[str]
    annotations: list[Label]
    legend: list[Label]
    markers: list[Box]  # the drawn markers of the scatter traces
    marker_texts: int
    chart: Box

    def trace(self, name: str) -> dict[str, Any]:
        return next(t for t in self.data if t["name"] == name)


def read_figure(page, element_id: str) -> Figure:
    raw = page.evaluate(FIGURE_JS, element_id)
    return Figure(
        data=raw["data"],
        xaxis=raw["xaxis"],
        yaxis=raw["yaxis"],
        xticks=raw["xticks"],
        yticks=raw["yticks"],
        annotations=[Label(a["text"], tuple(a["box"])) for a in raw["annotations"]],
        legend=[Label(a["text"], tuple(a["box"])) for a in raw["legend"]],
        markers=[tuple(b) for b in raw["markers"]],
        marker_texts=raw["marker_texts"],
        chart=tuple(raw["chart"]),
    )


def assert_fits_width(page, where: str) -> None:
    """No horizontal overflow: the document is no wider than the viewport."""
    width = page.evaluate(WIDTH_JS)
    assert width["scroll"] <= width["inner"], (
        f"{where}: {width['scroll']} px wide in {width['inner']}: {width['sticking']}"
    )


def assert_nav_usable(page, where: str) -> None:
    """Every main navigation link lies inside the viewport and would take a click (Playwright's trial
    click: visible, stable, and the topmost element at its centre)."""
    inner = page.evaluate("window.innerWidth")
    links = page.locator('nav[aria-label="Main"] a').all()
    assert [link.inner_text() for link in links] == ["Models", "Sensitivity", "Plans", "Jobs", "Latency"], where
    for link in links:
        box = link.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= inner, (where, link.inner_text(), box)
        link.click(trial=True)


def overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def overlapping_pairs(labels: Sequence[Label]) -> list[tuple[str, str]]:
    return [
        (first.text, second.text)
        for i, first in enumerate(labels)
        for second in labels[i + 1 :]
        if overlaps(first.box, second.box)
    ]


def inside(inner: Box, outer: Box) -> bool:
    return (
        inner[0] >= outer[0] - 0.5
        and inner[1] >= outer[1] - 0.5
        and inner[2] <= outer[2] + 0.5
        and inner[3] <= outer[3] + 0.5
    )


def unit_of(title: str) -> str:
    """The unit a header or axis title names in its last parentheses: "Size (KiB)" -> "KiB"."""
    found = re.search(r"\(([^()]*)\)\s*$", title)
    return found.group(1) if found else ""


def tick_values(labels: Iterable[str]) -> list[float]:
    """Tick labels as numbers (plotly writes minus signs as U+2212)."""
    return [float(label.replace("\u2212", "-")) for label in labels if label.strip()]


def on_axis(value: float, axis: dict[str, Any]) -> float:
    """A data value in the axis's own coordinates (log10 on a log axis, as its range is)."""
    return math.log10(value) if axis["type"] == "log" else value


def ticks_cover(values: Sequence[float], ticks: Sequence[float], axis: dict[str, Any]) -> bool:
    """At least two labelled ticks, and the extreme values lie within one tick interval of the extreme
    ticks, so that every point can be read off the axis."""
    if len(ticks) < 2:
        return False
    positions = sorted(on_axis(t, axis) for t in ticks)
    step = max(b - a for a, b in itertools.pairwise(positions))
    low, high = min(on_axis(v, axis) for v in values), max(on_axis(v, axis) for v in values)
    return positions[0] <= low + step + 1e-9 and positions[-1] >= high - step - 1e-9
