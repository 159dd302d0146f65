"""The command line's options as the libraries' configurations: analysis configurations, plan requests,
sample axes and exclusions, each refused with ``BadInput`` in the words of the option at fault."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the libraries load torch: imported where used, and here for the types only
    from planner import PlanRequest
    from sensitivity.results import Config


class BadInput(ValueError):
    """Input the user must fix; the message is printed on stderr."""


MiB = 1024 * 1024


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BadInput(f"--bits must be comma-separated integers, e.g. 8,4; got {text!r}") from None
    if not bits:
        raise BadInput("--bits lists no bit width")
    return bits


def sensitivity_config(args: argparse.Namespace) -> Config:
    """The analysis configuration the options ask for (BadInput when they are invalid)."""
    from sensitivity.results import EigenConfig, InterLayerConfig, TraceConfig

    shared = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": args.device,
        "hvp_method": args.hvp_method,
        **budget_options(args),
    }
    try:
        if args.method == "hawq_v1":
            return EigenConfig(**shared, **_optional(tolerance=args.tol, max_iterations=args.max_probes))
        probes = _probe_options(args.max_probes)
        if args.method == "hawq_v2":
            return TraceConfig(**shared, **_optional(tolerance=args.tol), **probes)
        return InterLayerConfig(
            **shared,
            bits=parse_bits(args.bits),
            **_optional(trace_tolerance=args.tol),
            **{f"trace_{key}": value for key, value in probes.items()},
        )
    except ValueError as error:
        raise BadInput(f"invalid options: {error}") from None


def budget_options(args: argparse.Namespace) -> dict[str, Any]:
    """memory_budget_mb (None for --memory-budget-mb 0) and time_budget_s when given; hawq_v1 has no
    time budget (its iterations are bounded by --max-probes)."""
    options: dict[str, Any] = {"memory_budget_mb": args.memory_budget_mb or None}
    if args.time_budget_s is not None:
        options["time_budget_s"] = args.time_budget_s
    return options


def _probe_options(max_probes: int | None) -> dict[str, Any]:  # keyword arguments of the configurations
    """max_probes, lowering min_probes (default 8, at least 2) when the cap is below it."""
    if max_probes is None:
        return {}
    return {"max_probes": max_probes, "min_probes": max(2, min(8, max_probes))}


def _optional(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def plan_request(args: argparse.Namespace) -> PlanRequest:
    from planner import PlanRequest

    options = {"batch_size": args.batch_size, **budget_options(args)}
    if args.max_probes is not None:
        options.update({f"trace_{k}": v for k, v in _probe_options(args.max_probes).items()})
    size = None if args.max_size_mb is None else _positive(args.max_size_mb, "--max-size-mb") * MiB
    sample_axes = sample_axes_option(args.sample_axis)
    try:
        return PlanRequest(
            method=args.method,
            search=args.search,
            candidates=tuple(args.candidates.split(",")),
            max_size_bytes=None if size is None else math.floor(size),
            max_bops=None if args.max_bops is None else int(_positive(args.max_bops, "--max-bops")),
            max_latency_ms=args.max_latency_ms,
            max_drop=args.max_drop,
            metric=args.metric,
            exclude=exclude_patterns(args.exclude),
            sample_axes=sample_axes,
            seed=args.seed,
            sensitivity_options=options,
            max_frontier_points=args.max_frontier_points,
            device=args.device,
        )
    except ValueError as error:
        raise BadInput(f"invalid options: {error}") from None


def sample_axes_option(values: list[str]) -> dict[str, int | None]:
    """Every --sample-axis NAME=AXIS as {name: axis} (None for 'none'); a name given twice is BadInput."""
    from sensitivity.samples import parse_sample_axis

    axes: dict[str, int | None] = {}
    for text in values:
        try:
            name, axis = parse_sample_axis(text)
        except ValueError as error:
            raise BadInput(str(error)) from None
        if name in axes and axes[name] != axis:
            raise BadInput(f"--sample-axis gives input {name!r} two axes: {axes[name]} and {axis}")
        axes[name] = axis
    return axes


def exclude_patterns(values: list[str]) -> tuple[str, ...]:
    """Every --exclude, each split at its commas (PlanRequest checks and bounds them)."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _positive(value: float, option: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{option} must be a positive number; got {value}")
    return value
