"""Text shared by the dashboard's pages and the CLI's tables: long names shortened from the left, a
sensitivity run's execution report in one line, and a measurement's latency relative to float."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def shortened(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, keeping its end: the last parts of a node name or
    module path say the most (``…/attention/self/query/MatMul``). The CLI's tables and the
    dashboard's (which puts the whole in a title attribute) both use it."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def describe_execution(execution: Mapping[str, Any]) -> str:
    """ "batch 16 x 3 probes per pass, double_backward (6.4 gradients per probe), peak RSS 2649 MiB;
    probes stopped: max_probes, worst SE/|trace| 8.17" (sensitivity.budget's report, in one line)."""
    parts = [
        f"batch {execution['batch_size']} x {execution['probes_per_pass']} probes per pass, {execution['hvp_method']}"
    ]
    if execution.get("probe_cost_gradients") is not None:
        parts[0] += f" ({execution['probe_cost_gradients']:.2g} gradients per probe)"
    if execution.get("peak_rss_mb") is not None:
        parts[0] += f", peak RSS {execution['peak_rss_mb']:.0f} MiB"
    traces = execution.get("traces") or {}
    if traces:
        worst = traces.get("worst_relative_se")
        parts.append(
            f"probes stopped: {traces['stopped']}" + ("" if worst is None else f", worst SE/|trace| {worst:.3g}")
        )
    return "; ".join(parts)


def latency_ratio(measured: Mapping[str, Any] | None) -> str:
    """ "0.81x float (+-0.02)": a measurement's latency relative to the float model timed interleaved
    with it in the same run (``planner.latency.compare_latency``); "" for one stored before that."""
    ratio = (measured or {}).get("latency_ratio_to_float")
    if ratio is None:
        return ""
    spread = (measured or {}).get("latency_ratio_spread") or 0.0
    return f"{ratio:.2f}x float (+-{spread:.2f})"


def slower_than_float_warning(measured: Mapping[str, Any] | None) -> str:
    """A short warning when a measurement is slower than the float model beyond its ratio's spread
    (``planner.result.Measurement.slower_than_float``, read from the stored JSON); "" otherwise."""
    ratio = (measured or {}).get("latency_ratio_to_float")
    spread = (measured or {}).get("latency_ratio_spread")
    if ratio is None or spread is None or ratio <= 1.0 + spread:
        return ""
    return (
        f"the plan measured slower than the float model: {ratio:.2f}x its latency (+-{spread:.2f}, "
        "timed interleaved in one run)"
    )
