"""Choosing a configuration: the budgets, the pareto and bisection searches, and whether a point
meets the constraints (step 3 of ``planner.plan``).

``pareto`` builds the whole frontier (exact DP on Ω for ``hawq_v2`` and ``fisher``, the quadratic solver on ΔL for
``interlayer``) and picks the best point within the budget; ``bisection`` demotes the least sensitive
layers, measuring each step for real. Both measure through the ``Measurer`` and return the chosen
point, the frontier and the search's details (``PlanRun.search``).

Budgets: ``max_size_bytes`` and ``max_bops`` are computed costs (``planner.cost``: weight
storage plus the other initializers and the float graph's own bytes; BOPS of one sample), so the
search enforces them exactly. The artifact also holds Q/DQ nodes and the plan's metadata
(ppocrv4-rec's size plan came out 9.7 % above a size that left the graph out), so
``max_size_bytes`` is checked on the artifact too:
when the chosen one is larger, the budget shrinks by the measured excess and the search runs
again (``SIZE_RETRIES``), and ``meets_constraints`` reads the measured size where there is one.
``max_latency_ms`` is a budget on the latency table's predicted latency (cost kind ``latency``,
``planner.latency_table``: one measured export per layer and candidate, additive up to the Q/DQ
pairs adjacent layers share), so it drives the search; the frontier points are then measured and
the measured ones compared with it (see ``within_latency``). Each measured latency is timed
interleaved with the float model in one run (``Measurer``, ``planner.latency.compare_latency``);
the budget stays in ms, and with it a configuration measured slower than the float model (ratio >
1 + its spread) is never chosen. ``objective="latency"`` chooses the fastest measured configuration
against the float model, never a slower one (``fastest_measured``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from planner.bisection import bisect
from planner.checks import require
from planner.cost import CostTable, layer_bops, layer_size_bytes
from planner.exclude import LayerCandidates
from planner.frontier import InfeasibleBudget, diagonal_frontier, solve_budget
from planner.measure import Measurer
from planner.objective import FP32, Objective
from planner.quadratic import quadratic_frontier, solve_quadratic
from planner.request import DIAGONAL_METHODS, PlanRequest
from planner.result import Measurement, PlanPoint

# Searches again when the chosen artifact is above max_size_bytes; the excess is the graph and Q/DQ
# bytes the computed size leaves out, so one retry usually fits (ppocrv4-rec: 9.7 % over, then in).
SIZE_RETRIES = 3


class NoFeasiblePlan(ValueError):
    """No configuration meets the constraints; ``minimum`` is the least achievable value of ``kind``."""

    def __init__(self, message: str, *, kind: str, limit: float, minimum: float | None) -> None:
        super().__init__(message)
        self.kind = kind
        self.limit = limit
        self.minimum = minimum


def predicted_point(objective: Objective, table: CostTable, configuration: Mapping[str, str]) -> PlanPoint:
    """``configuration`` unmeasured: its computed costs (size with the bytes outside layers), both
    predictions and, with a latency table, its predicted latency."""
    omega, loss = objective.evaluate(configuration)
    offset = table.latency_offset_ms
    return PlanPoint(
        configuration=dict(configuration),
        size_bytes=round(objective.cost(configuration, "size")) + table.fixed_size_bytes,
        bops=round(objective.cost(configuration, "bops")),
        omega=omega,
        loss_change=loss,
        latency_ms=None if offset is None else offset + objective.cost(configuration, "latency"),
    )


BUDGET_NAMES = {"size": "max_size_bytes", "bops": "max_bops", "latency": "max_latency_ms"}


def _fixed_cost(table: CostTable, kind: str) -> float:
    """What every configuration costs besides its layers' costs: the bytes outside layers, or the
    latency table's offset (``planner.latency_table.with_latency_costs``)."""
    if kind == "size":
        return table.fixed_size_bytes
    if kind == "latency":
        if table.latency_offset_ms is None:
            raise RuntimeError("the latency cost needs a latency table (plan() measures one)")
        return table.latency_offset_ms
    return 0


def _layer_budget(table: CostTable, request: PlanRequest) -> float | None:
    """The budget on the objective's per-layer costs (size: minus the bytes outside layers;
    latency: minus the table's offset)."""
    if request.budget is None:
        return None
    return float(request.budget - _fixed_cost(table, request.cost_kind))


def minimum_cost(
    table: CostTable, candidates: Sequence[str], kind: str, offered: Mapping[str, Sequence[str]] | None = None
) -> int:
    """The computed cost of the cheapest configuration (size includes the bytes outside layers);
    ``offered``: each layer's own candidates (``planner.exclude``), else ``candidates`` for all."""
    cost = layer_size_bytes if kind == "size" else layer_bops
    other = table.fixed_size_bytes if kind == "size" else 0

    def names(layer: str) -> Sequence[str]:
        return candidates if offered is None else offered[layer]

    return other + sum(min(cost(entry, c) for c in names(layer)) for layer, entry in table.items())


def check_budget_feasible(table: CostTable, request: PlanRequest, offered: LayerCandidates) -> None:
    """NoFeasiblePlan naming the minimum achievable cost when the size/BOPS budget is below it."""
    if request.budget is None or request.cost_kind == "latency":  # latency: once the table is measured
        return
    kind = request.cost_kind
    cheapest = minimum_cost(table, request.candidates, kind, offered.offered)
    if cheapest > request.budget:
        name = BUDGET_NAMES[kind]
        unit = "bytes" if kind == "size" else "BOPS"
        kept = f" ({len(offered.exclusions)} layers excluded)" if offered.exclusions else ""
        raise NoFeasiblePlan(
            f"no configuration meets {name}={request.budget:.6g}: the cheapest with candidates "
            f"{list(request.candidates)}{kept} costs {cheapest:.6g} {unit}",
            kind=name,
            limit=float(request.budget),
            minimum=float(cheapest),
        )


def _fits_size(point: PlanPoint, limit: int) -> bool:
    size = point.size_bytes if point.measured is None else point.measured.size_bytes
    return size <= limit


def meets_constraints(point: PlanPoint, request: PlanRequest) -> bool:
    """Size (the artifact's where measured, else computed) and BOPS within their budget,
    measured latency and drop within theirs."""
    checks = []
    if request.max_size_bytes is not None:
        checks.append(_fits_size(point, request.max_size_bytes))
    if request.max_bops is not None:
        checks.append(point.bops <= request.max_bops)
    measured = point.measured
    if request.max_latency_ms is not None:
        latency = None if measured is None else measured.latency
        checks.append(latency is not None and latency.p50_ms <= request.max_latency_ms)
    if request.max_drop is not None:
        checks.append(measured is not None and measured.drop_against(request.baseline) <= request.max_drop)
    return all(checks)


def _evenly(points: Sequence[PlanPoint], count: int) -> list[PlanPoint]:
    """At most ``count`` points spread evenly, keeping the first and the last."""
    if len(points) <= count:
        return list(points)
    picks = np.unique(np.linspace(0, len(points) - 1, count).round().astype(int))
    return [points[k] for k in picks]


def _frontier_points(
    objective: Objective, table: CostTable, request: PlanRequest
) -> tuple[list[PlanPoint], dict[str, Any]]:
    """The (cost, predicted loss) frontier by increasing cost: exact DP on Ω, or the quadratic solver on ΔL."""
    kind = request.cost_kind
    if request.diagonal:
        frontier = diagonal_frontier(objective, kind)
        configurations = [objective.configuration(point.choice) for point in frontier]
        details = {"solver": "diagonal-dp", "points": len(frontier)}
    else:
        results = quadratic_frontier(objective, kind, time_limit=request.solver_time_limit_s)
        configurations = [objective.configuration(result.choice) for result in results]
        details = {
            "solver": "quadratic",
            "points": len(results),
            "proven_optimal": all(result.proven_optimal for result in results),
            "max_relative_gap": max((result.relative_gap for result in results), default=0.0),
        }
    return [predicted_point(objective, table, c) for c in configurations], details


def _value(point: PlanPoint, method: str) -> float:
    return point.omega if method in DIAGONAL_METHODS else point.loss_change


def _best_within_budget(
    objective: Objective, table: CostTable, request: PlanRequest
) -> tuple[PlanPoint, dict[str, Any]]:
    """The least predicted loss within the computed-cost budget, solved exactly for that budget."""
    kind, budget = request.cost_kind, _layer_budget(table, request)
    if budget is None:
        budget = float(sum(row.max() for row in objective.cost_table(kind)))
    try:
        if request.diagonal:
            choice, details = solve_budget(objective, kind, budget).choice, {}
        else:
            result = solve_quadratic(objective, kind, budget, time_limit=request.solver_time_limit_s)
            choice = result.choice
            details = {
                "budget_solver": result.method,
                "lower_bound": result.lower_bound,
                "gap": result.gap,
                "proven_optimal": result.proven_optimal,
            }
    except InfeasibleBudget as error:  # checked up front already; kept so a rounding difference still reads clearly
        if request.budget is None:  # without a budget the search allows the costliest configuration: never here
            raise
        name, minimum, message = BUDGET_NAMES[kind], error.min_cost, str(error)
        if kind == "latency":  # the table's prediction, not a measurement: said so
            minimum += _fixed_cost(table, kind)
            message = (
                f"no configuration meets {name}={request.budget:g}: the fastest has a predicted median "
                f"latency of {minimum:.4g} ms (from the latency table)"
            )
        raise NoFeasiblePlan(message, kind=name, limit=float(request.budget), minimum=minimum) from None
    return predicted_point(objective, table, objective.configuration(choice)), details


def pareto(
    objective: Objective, table: CostTable, request: PlanRequest, measurer: Measurer
) -> tuple[PlanPoint, list[PlanPoint], dict[str, Any]]:
    """Frontier, then: the best point within the budget; with max_drop or a latency budget,
    the best measured frontier point meeting them."""
    measurer.progress("search", 0.0, f"building the {request.method} frontier")
    frontier, details = _frontier_points(objective, table, request)
    best, best_details = _best_within_budget(objective, table, request)
    details.update(best_details)
    frontier = _with_point(frontier, best, request.cost_kind)
    budget = request.budget
    eligible = [p for p in frontier if budget is None or _cost_of(p, request.cost_kind) <= budget]
    # Measure an even spread of the eligible points, always including the predicted best.
    to_measure = _with_point(_evenly(eligible, max(request.max_frontier_points - 1, 1)), best, request.cost_kind)
    for k, point in enumerate(to_measure):
        measurer.progress("search", k / len(to_measure), f"measuring frontier point {k + 1}/{len(to_measure)}")
        measurer.measure(point.configuration)
    best = _artifact_within_size(objective, table, request, measurer, best, details)
    frontier = _with_point(frontier, best, request.cost_kind)
    measured = [measurer.measured(p) for p in _with_point(to_measure, best, request.cost_kind)]
    if request.max_size_bytes is not None:
        measured = [p for p in measured if _fits_size(p, request.max_size_bytes)] or measured
    details["measured_points"] = len(measured)
    if request.cost_kind == "latency":  # predicted latency is a table's estimate: show only what was measured
        frontier = sorted(measured, key=lambda p: _cost_of(p, "latency"))
    if request.objective == "latency":
        meeting = [p for p in measured if meets_constraints(p, request)]
        return fastest_measured(meeting, objective, table, measurer, details, request.baseline), frontier, details
    return _chosen_among_measured(best, measured, request, details), frontier, details


def fastest_measured(
    points: Sequence[PlanPoint],
    objective: Objective,
    table: CostTable,
    measurer: Measurer,
    details: dict[str, Any],
    baseline: str,
) -> PlanPoint:
    """The latency objective's choice among ``points`` (measured, meeting the constraints): the one
    with the least latency ratio to the float model, all timed interleaved with it in one run
    (``Measurer.relative_latency``); the float configuration itself when none is below 1. The
    ratios and how the point was chosen go into ``details``."""
    float_point = measurer.measured(predicted_point(objective, table, objective.uniform(FP32)))
    others = [p for p in points if p.configuration != float_point.configuration]
    ratios = measurer.relative_latency([p.configuration for p in others]) if others else []
    details["latency_ratios"] = [
        {"ratio": r.ratio, "ratio_spread": r.ratio_spread, "rounds": r.rounds, "drop": _drop(p, baseline)}
        for p, r in zip(others, ratios)
    ]
    if not ratios:
        details["chosen_by"] = (
            "the float model: no quantized configuration meeting the constraints was measured "
            "(none predicted to save time, or none within them)"
        )
        details["latency_ratio"] = 1.0
        return float_point
    fastest = min(range(len(others)), key=lambda k: ratios[k].ratio)
    ratio = ratios[fastest]
    details["latency_ratio"] = ratio.ratio
    if not ratio.faster:
        details["chosen_by"] = (
            f"the float model: the fastest of {len(others)} measured configurations meeting the constraints "
            f"runs {ratio.ratio:.3f}x the float model's time (± {ratio.ratio_spread:.3f} over "
            f"{ratio.rounds} rounds), not measurably faster"
        )
        details["latency_ratio"] = 1.0
        return float_point
    details["chosen_by"] = (
        f"fastest of {len(others)} measured configurations meeting the constraints: "
        f"{ratio.ratio:.3f}x the float model's time (± {ratio.ratio_spread:.3f}, interleaved)"
    )
    return others[fastest]


def _chosen_among_measured(
    best: PlanPoint, measured: list[PlanPoint], request: PlanRequest, details: dict[str, Any]
) -> PlanPoint:
    """``best``, unless max_drop or a latency budget is set: then the best measured point meeting them
    (how it was chosen goes into ``details``)."""
    if request.max_latency_ms is not None:
        measured = within_latency(measured, request.max_latency_ms)
    if request.max_drop is not None:
        details["chosen_by"] = "cheapest measured point within max_drop"
        return _choose_by_drop(measured, request, request.max_drop)
    if request.max_latency_ms is not None:
        details["chosen_by"] = "least predicted loss among the measured points within max_latency_ms"
        return min(measured, key=lambda p: _value(p, request.method))
    return best


def _artifact_within_size(
    objective: Objective,
    table: CostTable,
    request: PlanRequest,
    measurer: Measurer,
    best: PlanPoint,
    details: dict[str, Any],
) -> PlanPoint:
    """``best`` when its artifact fits ``max_size_bytes``; else the best point within a budget
    shrunk by the artifact's excess over its computed size, up to ``SIZE_RETRIES`` times (the
    last point tried is returned; ``meets_constraints`` then says it does not fit)."""
    limit = request.max_size_bytes
    if limit is None:
        return best
    for retry in range(SIZE_RETRIES + 1):
        artifact = measurer.measure(best.configuration).size_bytes
        details["size_retries"] = retry
        if artifact <= limit or retry == SIZE_RETRIES:
            return best
        budget = best.size_bytes - (artifact - limit)
        if budget < 1:
            return best
        measurer.progress(
            "search",
            1.0,
            f"the artifact is {artifact - limit} bytes above max_size_bytes: "
            f"searching again within {budget} computed bytes",
        )
        try:
            best, _ = _best_within_budget(objective, table, dataclasses.replace(request, max_size_bytes=budget))
        except NoFeasiblePlan:
            return best
    return best


def _with_point(points: Sequence[PlanPoint], extra: PlanPoint, kind: str) -> list[PlanPoint]:
    """``points`` plus ``extra`` (if its configuration is new), by increasing cost ``kind``."""
    if any(p.configuration == extra.configuration for p in points):
        return list(points)
    return sorted([*points, extra], key=lambda p: _cost_of(p, kind))


def _cost_of(point: PlanPoint, kind: str) -> float:
    if kind == "latency":
        if point.latency_ms is None:
            raise RuntimeError("the latency cost needs predicted latencies (a latency table)")
        return point.latency_ms
    return point.size_bytes if kind == "size" else point.bops


def _measurement(point: PlanPoint) -> Measurement:
    """What a point the search measured (``Measurer.measured``) measured."""
    if point.measured is None:
        raise RuntimeError("the searches compare measured points only; this one was not measured")
    return point.measured


def _drop(point: PlanPoint, baseline: str) -> float:
    """The measured drop against the request's baseline (``PlanRequest.baseline``)."""
    return _measurement(point).drop_against(baseline)


def _median_latency_ms(point: PlanPoint) -> float:
    latency = _measurement(point).latency
    if latency is None:
        raise RuntimeError("the searches measure latency with every point; this one has none")
    return latency.p50_ms


def _ratio(point: PlanPoint) -> float:
    """The point's latency relative to the float model timed in the same run (its p50 over the
    float p50 for a measurement without one: never from the Measurer, which always times both)."""
    measured = _measurement(point)
    if measured.ratio_to_float is not None:
        return measured.ratio_to_float
    if measured.float_p50_ms:
        return _median_latency_ms(point) / measured.float_p50_ms
    raise RuntimeError("the searches measure latency against the float model with every point; this one has none")


def within_latency(measured: Sequence[PlanPoint], max_latency_ms: float) -> list[PlanPoint]:
    """Latency is measured, not predicted: the measured frontier points (BOPS frontier) whose
    measured median latency (robust to scheduling noise, unlike the mean; timed interleaved with
    the float model) is within the budget, less those measured slower than the float model
    (ratio > 1 + its spread): with latency the objective, quantizing must not make it slower (w8
    measured 1.3-1.5x float on every CNN measured, issue 13)."""
    fast = [p for p in measured if _median_latency_ms(p) <= max_latency_ms]
    if not fast:
        fastest = min(measured, key=_ratio)
        raise NoFeasiblePlan(
            f"no measured configuration meets max_latency_ms={max_latency_ms:g}: the fastest of "
            f"{len(measured)} measured frontier points (by its ratio to the float model timed in the same run, "
            f"{_ratio(fastest):.3g}x) has a median latency of {_median_latency_ms(fastest):.4g} ms",
            kind="max_latency_ms",
            limit=float(max_latency_ms),
            minimum=min(_median_latency_ms(p) for p in measured),
        )
    not_slower = [p for p in fast if not p.measured_slower_than_float]
    if not not_slower:
        least = min(fast, key=_ratio)
        raise NoFeasiblePlan(
            f"every measured configuration within max_latency_ms={max_latency_ms:g} measured slower than the "
            f"float model timed in the same run (the least ratio of {len(fast)} is {_ratio(least):.3g}x "
            f"+- {_measurement(least).ratio_spread or 0:.2g}): plan without quantizing, or allow more latency",
            kind="max_latency_ms",
            limit=float(max_latency_ms),
            minimum=min(_median_latency_ms(p) for p in measured),
        )
    return not_slower


def _choose_by_drop(measured: Sequence[PlanPoint], request: PlanRequest, max_drop: float) -> PlanPoint:
    """The cheapest measured point whose drop is within max_drop."""
    good = [p for p in measured if _drop(p, request.baseline) <= max_drop]
    if not good:
        least = min(_drop(p, request.baseline) for p in measured)
        raise NoFeasiblePlan(
            f"no measured configuration meets max_drop={max_drop:g} pp within the constraints: "
            f"the least drop among {len(measured)} measured points is {least:.4g} pp",
            kind="max_drop",
            limit=float(max_drop),
            minimum=least,
        )
    return min(good, key=lambda p: (_cost_of(p, request.cost_kind), _value(p, request.method)))


def _with_uniform_low(
    frontier: list[PlanPoint], objective: Objective, table: CostTable, measurer: Measurer, low: str
) -> list[PlanPoint]:
    """The bisection's measured steps and, measured too, every layer at ``low``. The demotion order
    follows the latency table's prediction, which can be biased against a configuration that is in
    fact faster (ddddocr-common: uniform w8a8 predicted 1.68x the float time, measured 0.89x, while the
    bisection's two quantized steps ran 1.003x); one more measurement lets it compete."""
    uniform = objective.uniform(low)
    if any(point.configuration == uniform for point in frontier):
        return frontier
    return [*frontier, measurer.measured(predicted_point(objective, table, uniform))]


def bisection_candidates(objective: Objective, request: PlanRequest) -> tuple[str, str]:
    """(low, high): demote from the most expensive candidate (fp32 when offered) to the cheapest
    one in the search's cost (ties: fewer BOPS, then fewer bits of activation). On predicted
    latency every quantized candidate may be slower than fp32 (the small layers of
    tests/models.latency_mixed_model): low is then the least slow one, and no layer is demoted
    (``planner.bisection``'s demotable layers save cost)."""
    names = request.candidates
    kind = request.cost_kind

    def total(name: str, cost: str) -> float:
        return objective.cost(objective.uniform(name), cost)

    high = "fp32" if "fp32" in names else max(names, key=lambda n: (total(n, kind), total(n, "bops")))
    lower = [n for n in names if n != high] if kind == "latency" else names
    require(bool(lower), f"bisection needs two candidates; got {list(names)}")
    low = min(lower, key=lambda n: (total(n, kind), total(n, "bops"), names.index(n)))
    require(low != high, f"bisection needs two candidates of different cost; got {list(names)}")
    return low, high


def bisection(
    objective: Objective, table: CostTable, request: PlanRequest, measurer: Measurer
) -> tuple[PlanPoint, list[PlanPoint], dict[str, Any]]:
    """Demotion order by predicted sensitivity per cost saved; binary search measured for real.
    The measured steps are the frontier. With the latency objective the cost is the latency
    table's prediction (a layer predicted not to save time is never demoted) and the chosen step is
    the fastest measured one within max_drop, measured against the float model (``fastest_measured``)."""
    max_drop = request.max_drop
    if max_drop is None:  # PlanRequest refuses a bisection without it
        raise ValueError("bisection needs max_drop (percentage points)")
    low, high = bisection_candidates(objective, request)
    ordering = "diagonal" if request.diagonal else "interlayer"
    measurer.progress("search", 0.0, f"bisection: demoting {high} -> {low} ({ordering} order)")
    result = bisect(
        objective,
        request.cost_kind,
        lambda configuration: measurer.measure(configuration).drop_against(request.baseline),
        max_drop,
        low=low,
        high=high,
        ordering=ordering,
    )
    steps = sorted({step.k: step for step in result.steps}.values(), key=lambda step: -step.k)
    frontier = [measurer.measured(predicted_point(objective, table, step.configuration)) for step in steps]
    chosen = measurer.measured(predicted_point(objective, table, result.configuration))
    details = {
        "solver": "bisection",
        "low": low,
        "high": high,
        "ordering": ordering,
        "order": list(result.order),
        "demoted": result.best.k,
        "within_tolerance": result.within_tolerance,
        "steps": [{"k": step.k, "drop": step.drop, "cost": step.cost} for step in result.steps],
    }
    if not result.within_tolerance:
        raise NoFeasiblePlan(
            f"no measured configuration meets max_drop={max_drop:g} pp: even the undemoted "
            f"configuration drops {result.best.drop:.4g} pp",
            kind="max_drop",
            limit=float(max_drop),
            minimum=result.best.drop,
        )
    if request.objective == "latency":
        frontier = _with_uniform_low(frontier, objective, table, measurer, low)
        within = [point for point in frontier if _drop(point, request.baseline) <= max_drop]
        chosen = fastest_measured(within, objective, table, measurer, details, request.baseline)
        details["demoted"] = sum(chosen.configuration[layer] == low for layer in result.order)
    budget = request.budget
    if budget is not None and _cost_of(chosen, request.cost_kind) > budget:
        cheapest = min(_cost_of(p, request.cost_kind) for p in frontier if _drop(p, request.baseline) <= max_drop)
        raise NoFeasiblePlan(
            f"bisection found no configuration within both max_drop={max_drop:g} pp and the "
            f"{request.cost_kind} budget {budget:.6g}: the cheapest measured one within the drop "
            f"costs {cheapest:.6g}",
            kind=BUDGET_NAMES[request.cost_kind],
            limit=float(budget),
            minimum=float(cheapest),
        )
    return chosen, frontier, details
