"""The command line's options as the libraries' configurations: analysis configurations, plan requests,
sample axes and exclusions, each refused with ``BadInput`` in the words of the option at fault.

The options are read in two steps: ``sensitivity_options`` and ``plan_fields`` turn them into the
configurations' keyword arguments with no library imported (what the remote commands send: the
server checks them with the libraries, at submission), and ``sensitivity_config`` and
``plan_request`` build the libraries' configurations from those (what the local commands run).
The light client install (``pip install mpq``, no torch) runs the first step only."""

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
DEFAULT_BITS = "8,4"  # --bits for interlayer and fisher


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BadInput(f"--bits must be comma-separated integers, e.g. 8,4; got {text!r}") from None
    if not bits:
        raise BadInput("--bits lists no bit width")
    return bits


def sensitivity_options(args: argparse.Namespace) -> dict[str, Any]:
    """The analysis configuration's keyword arguments the options ask for (``sensitivity.results``'
    ``EigenConfig`` for hawq_v1, ``TraceConfig`` for hawq_v2, ``InterLayerConfig`` for interlayer, ``FisherConfig`` for fisher, ``MeasuredConfig`` for measured),
    without importing the library: the remote command sends them as the request's options."""
    shared = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": args.device,
        "hvp_method": args.hvp_method,
        **budget_options(args),
    }
    _refuse_foreign_options(args)
    bits = parse_bits(args.bits or DEFAULT_BITS)
    if args.method == "hawq_v1":
        return {**shared, **_optional(tolerance=args.tol, max_iterations=args.max_probes)}
    if args.method == "fisher":  # one gradient per sample: no probes, no tolerance
        if args.tol is not None or args.max_probes is not None:
            raise BadInput("--tol and --max-probes bound probes; fisher takes one gradient per sample and has none")
        return {**shared, "bits": bits}
    if args.method == "measured":  # one export per (layer, candidate): no probes, no bit widths
        if args.tol is not None or args.max_probes is not None:
            raise BadInput("--tol and --max-probes bound probes; measured runs each layer quantized alone and has none")
        candidates = None if args.candidates is None else candidate_names(args.candidates)
        return {**shared, **_optional(candidates=candidates, quantity=args.quantity)}
    probes = _probe_options(args.max_probes)
    if args.method == "hawq_v2":
        return {**shared, **_optional(tolerance=args.tol), **probes}
    return {
        **shared,
        "bits": bits,
        **_optional(trace_tolerance=args.tol),
        **{f"trace_{key}": value for key, value in probes.items()},
    }


# planner.request.PROBING_METHODS, written out (a test pins them equal): --max-probes bounds their probes.
PROBING_METHODS = ("hawq_v2", "interlayer")
# Which method reads each method-specific option: given with another method, it would be ignored.
_METHOD_OPTIONS = {
    "bits": ("--bits", ("interlayer", "fisher")),
    "candidates": ("--candidates", ("measured",)),
    "quantity": ("--quantity", ("measured",)),
}


def _refuse_foreign_options(args: argparse.Namespace) -> None:
    """An option the method does not read is refused rather than silently ignored."""
    for attribute, (flag, methods) in _METHOD_OPTIONS.items():
        if getattr(args, attribute, None) is not None and args.method not in methods:
            raise BadInput(f"{flag} is read by --method {' or '.join(methods)} only; --method {args.method} ignores it")


def candidate_names(text: str) -> tuple[str, ...]:
    """``--candidates``: comma-separated names, spaces around them ignored."""
    return tuple(part.strip() for part in text.split(","))


def sensitivity_config(args: argparse.Namespace) -> Config:
    """The analysis configuration the options ask for (BadInput when they are invalid)."""
    from sensitivity.results import EigenConfig, FisherConfig, InterLayerConfig, MeasuredConfig, TraceConfig

    options = sensitivity_options(args)
    kinds: dict[str, type[Config]] = {
        "hawq_v1": EigenConfig,
        "hawq_v2": TraceConfig,
        "interlayer": InterLayerConfig,
        "fisher": FisherConfig,
        "measured": MeasuredConfig,
    }
    kind = kinds[args.method]
    try:
        return kind(**options)
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


def plan_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``planner.PlanRequest``'s keyword arguments the options ask for, without importing the planner
    (the remote command builds its request body from them)."""
    options = {"batch_size": args.batch_size, **budget_options(args)}
    if args.max_probes is not None and args.method not in PROBING_METHODS:
        raise BadInput(f"--max-probes bounds Hutchinson probes, which --method {args.method} does not run")
    if args.max_probes is not None:
        options.update({f"trace_{k}": v for k, v in _probe_options(args.max_probes).items()})
    size = None if args.max_size_mb is None else _positive(args.max_size_mb, "--max-size-mb") * MiB
    return {
        "method": args.method,
        "search": args.search,
        "candidates": candidate_names(args.candidates),
        "max_size_bytes": None if size is None else math.floor(size),
        "max_bops": None if args.max_bops is None else int(_positive(args.max_bops, "--max-bops")),
        "max_latency_ms": args.max_latency_ms,
        "max_drop": args.max_drop,
        "metric": args.metric,
        "baseline": args.baseline,
        "objective": args.objective,
        "exclude": exclude_patterns(args.exclude),
        "sample_axes": sample_axes_option(args.sample_axis),
        "seed": args.seed,
        "sensitivity_options": options,
        "max_frontier_points": args.max_frontier_points,
        "device": args.device,
    }


def plan_request(args: argparse.Namespace) -> PlanRequest:
    from planner import PlanRequest

    fields = plan_fields(args)
    try:
        return PlanRequest(**fields)
    except ValueError as error:
        raise BadInput(f"invalid options: {error}") from None


def sample_axes_option(values: list[str]) -> dict[str, int | None]:
    """Every --sample-axis NAME=AXIS as {name: axis} (None for 'none'); a name given twice is BadInput."""
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


def parse_sample_axis(text: str) -> tuple[str, int | None]:
    """``NAME=AXIS`` (``--sample-axis``; AXIS an int or ``none``) as (name, axis); ValueError otherwise.
    The bounds of names and axes are the library's (``sensitivity.samples.check_sample_axes``)."""
    name, equals, axis = text.rpartition("=")
    axis = axis.strip().lower()
    if not equals or not name.strip() or not (axis == "none" or axis.isdigit()):
        raise ValueError(f"--sample-axis takes NAME=AXIS with AXIS an integer or 'none'; got {text!r}")
    return name.strip(), None if axis == "none" else int(axis)


def exclude_patterns(values: list[str]) -> tuple[str, ...]:
    """Every --exclude, each split at its commas (PlanRequest checks and bounds them)."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _positive(value: float, option: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{option} must be a positive number; got {value}")
    return value
