"""Search benchmark: the diagonal frontier DP and the inter-layer solver on random instances.

Prints markdown tables (paste them into docs/benchmarks.md, section "Search"):

- DP: time and size of the exact (size, Ω) frontier;
- quadratic: at a tight and a medium budget (10 % and 30 % of the diagonal frontier's cost
  range above its minimum), the method chosen by ``auto``, its time, ΔL, lower bound, gap and
  whether it is proven optimal; where the MILP proves the optimum, also the heuristic alone, to
  show how far it is from the optimum; then instances with an indefinite G;
- the quadratic frontier of the 10-layer instances.

Usage: ``.venv/bin/python bench/search.py [--seed 0] [--time-limit 5]``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

# Run as `python bench/search.py`, this folder comes first on sys.path, and a sibling script
# named like a package (bench/planner.py) would shadow it: drop the folder.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from planner.frontier import Frontier, diagonal_frontier
from planner.objective import Objective, synthetic_objective
from planner.quadratic import QuadraticResult, quadratic_frontier, solve_quadratic

CANDIDATE_SETS = {
    3: ("fp32", "w8a8", "w4a8"),
    4: ("fp32", "w8a8", "w4a8", "w4"),
    5: ("fp32", "w8a8", "w4a8", "w8", "w4"),
}
LAYER_COUNTS = (10, 50, 200)
BUDGETS = {"tight": 0.1, "medium": 0.3}  # fraction of the diagonal frontier's cost range above its minimum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds per solver phase")
    args = parser.parse_args()
    print(
        f"seed {args.seed}, time limit {args.time_limit:g} s per phase, {platform.machine()}, "
        "synthetic_objective (integer size costs; PSD G unless marked indefinite)\n"
    )
    instances = {
        (n, k): synthetic_objective(n, CANDIDATE_SETS[k], seed=args.seed + n + k)
        for n in LAYER_COUNTS
        for k in CANDIDATE_SETS
    }
    frontiers = dp_table(instances)
    print(
        "| layers | candidates | budget | method | time (s) | ΔL | lower bound | bound from | gap | rel. gap | proven |"
    )
    print("|---:|---:|---|---|---:|---:|---:|---|---:|---:|---|")
    for (n, k), objective in instances.items():
        for label, fraction in BUDGETS.items():
            quadratic_rows(objective, f"{k}", label, budget_at(frontiers[(n, k)], fraction), args.time_limit)
    for n in LAYER_COUNTS:  # indefinite G: 20 % of the coupling directions negative
        objective = synthetic_objective(n, CANDIDATE_SETS[5], seed=args.seed + n, negative_fraction=0.2)
        frontier = diagonal_frontier(objective, "size")
        quadratic_rows(objective, "5, indefinite", "tight", budget_at(frontier, BUDGETS["tight"]), args.time_limit)
    print()
    frontier_table(instances[(10, 4)], args.time_limit)


def budget_at(frontier: Frontier, fraction: float) -> float:
    """min cost + fraction × (max − min) over the diagonal frontier."""
    return float(frontier.costs[0] + fraction * (frontier.costs[-1] - frontier.costs[0]))


def dp_table(instances: dict[tuple[int, int], Objective]) -> dict[tuple[int, int], Frontier]:
    """Frontier DP timings and sizes; returns the frontiers."""
    print("| layers | candidates | DP frontier points | DP time (s) |")
    print("|---:|---:|---:|---:|")
    frontiers = {}
    for (n, k), objective in instances.items():
        start = time.perf_counter()
        frontiers[(n, k)] = diagonal_frontier(objective, "size")
        seconds = time.perf_counter() - start
        print(f"| {n} | {k} | {len(frontiers[(n, k)])} | {seconds:.3f} |")
    print()
    return frontiers


def quadratic_rows(objective: Objective, candidates: str, label: str, budget: float, time_limit: float) -> None:
    """``auto`` at the budget; where the MILP proves the optimum, the heuristic alone as well."""
    result = solve_quadratic(objective, "size", budget, time_limit=time_limit)
    print(row(objective.n_layers, candidates, label, result))
    if result.proven_optimal and result.method == "milp":
        heuristic = solve_quadratic(objective, "size", budget, method="heuristic", time_limit=time_limit)
        print(row(objective.n_layers, candidates, label, heuristic))


def row(n: int, candidates: str, label: str, r: QuadraticResult) -> str:
    return (
        f"| {n} | {candidates} | {label} | {r.method} | {r.seconds:.2f} | {r.value:.4f} | {r.lower_bound:.4f} | "
        f"{r.bound_method} | {r.gap:.4f} | {r.relative_gap:.1%} | {'yes' if r.proven_optimal else 'no'} |"
    )


def frontier_table(objective: Objective, time_limit: float) -> None:
    start = time.perf_counter()
    results = quadratic_frontier(objective, "size", max_points=8, time_limit=time_limit)
    seconds = time.perf_counter() - start
    print(
        f"quadratic_frontier, {objective.n_layers} layers × 4 candidates, 8 budgets: "
        f"{len(results)} non-dominated points in {seconds:.2f} s "
        f"({sum(r.proven_optimal for r in results)} proven optimal)\n"
    )
    print("| budget | cost | ΔL | Ω | method |")
    print("|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r.budget:.0f} | {r.cost:.0f} | {r.value:.4f} | {objective.evaluate(r.choice)[0]:.4f} | {r.method} |")


if __name__ == "__main__":
    main()
