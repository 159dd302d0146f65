"""Planner benchmark: what the plans buy against uniform and random allocations, measured.

For the trained digits CNN (and, with ``--transformer``, the zoo's tiny transformer block, random
weights, evaluated by agreement with the float model) it measures, in onnxruntime:

- float, uniform w8a8, uniform w4a8;
- random configurations within the budget of about the HAWQ-V2 plan's size (mean ± std over
  ``--random`` of them);
- the HAWQ-V2 plan and the inter-layer plan (pareto search under the same size budget,
  both from one inter-layer sensitivity analysis);

each with the computed size, the artifact's bytes, the metric and the median latency
(batch 1). Then the frontier solve time for 200 synthetic layers × 5 candidates.
Prints markdown (section "Planner" of docs/benchmarks.md).

Usage: ``.venv/bin/python bench/planner.py [--seed 0] [--random 10] [--budget-fraction 0.25] [--transformer]``.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and its name would shadow the
# ``planner`` package; drop that entry before importing the package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from planner.cost import configuration_cost, layer_cost_table
from planner.evaluate import evaluate
from planner.export import export_model
from planner.frontier import diagonal_frontier, solve_budget
from planner.latency import cpu_description, measure_latency
from planner.objective import synthetic_objective
from planner.plan import PlanRequest, PlanResult, plan
from planner.quadratic import solve_quadratic
from sensitivity.onnx_program import load_onnx
from sensitivity.results import InterLayerConfig
from sensitivity.run import compute_sensitivity

CANDIDATES = ("fp32", "w8a8", "w4a8", "w8", "w4")
LATENCY = {"warmup": 20, "repeats": 200, "batch_size": 1, "device": "cpu"}


@dataclass(frozen=True)
class Row:
    name: str
    size_bytes: float  # computed (weights, scales, zero points, other initializers)
    artifact_bytes: float
    metric: float
    metric_std: float
    latency_p50_ms: float
    note: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    model: onnx.ModelProto
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]


def digits_case(seed: int) -> Case:
    from sensitivity.examples import export_onnx, trained_digits_cnn

    model, data = trained_digits_cnn(seed=seed)
    proto = export_onnx(model, torch.from_numpy(data.train_x[:1]))
    return Case(
        "digits CNN (top-1 accuracy, %)",
        proto,
        {"input": data.train_x[:512], "labels": data.train_y[:512]},
        {"input": data.test_x, "labels": data.test_y},
    )


def transformer_case(seed: int) -> Case:
    from sensitivity import zoo

    module = zoo.build("transformer_block", seed=seed)
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((768, 5, 16)).astype(np.float32)
    proto = zoo.export(module, torch.from_numpy(data[:2]))
    return Case("tiny transformer block (agreement with float, %)", proto, {"input": data[:256]}, {"input": data[256:]})


def measure(case: Case, configuration: Mapping[str, str], float_bytes: bytes) -> tuple[int, float, float]:
    """(artifact bytes, metric, median latency ms) of one configuration."""
    exported = export_model(case.model, configuration, case.calibration)
    result = evaluate(exported, float_bytes, case.evaluation)
    latency = measure_latency(exported.model_bytes, case.evaluation, **LATENCY)
    return len(exported.model_bytes), result.metric, latency.p50_ms


def random_configurations(
    layers: list[str], table, size: float, budget: float, count: int, seed: int
) -> list[dict[str, str]]:
    """``count`` configurations drawn uniformly from those within ``budget`` and at least 95 % of
    ``size`` (the plan's size); the ``count`` nearest to ``size`` within the budget when fewer are there."""
    rng = np.random.default_rng(seed)
    if len(CANDIDATES) ** len(layers) <= 200_000:
        pool = [dict(zip(layers, combo)) for combo in itertools.product(CANDIDATES, repeat=len(layers))]
    else:
        pool = [dict(zip(layers, rng.choice(CANDIDATES, size=len(layers)))) for _ in range(200_000)]
    sizes = np.array([configuration_cost(table, c).size_bytes for c in pool], dtype=float)
    near = np.flatnonzero((sizes <= budget) & (sizes >= 0.95 * size))
    if len(near) < count:
        distance = np.where(sizes <= budget, np.abs(sizes - size), np.inf)
        near = np.argsort(distance)[:count]
    picks = rng.choice(near, size=min(count, len(near)), replace=False)
    return [pool[k] for k in picks]


def plan_row(name: str, result: PlanResult) -> Row:
    measured = result.plan.measured
    layers = ", ".join(result.plan.configuration.values())
    return Row(name, result.plan.size_bytes, measured.size_bytes, measured.metric, 0.0, measured.latency.p50_ms, layers)


def run_case(case: Case, seed: int, random_count: int, budget_fraction: float) -> tuple[list[Row], str]:
    float_bytes = case.model.SerializeToString()
    start = time.perf_counter()
    config = InterLayerConfig(bits=(8, 4), seed=seed, trace_max_probes=64, device="cpu")
    sensitivity = compute_sensitivity(load_onnx(case.model), case.calibration, config)
    analysis_s = time.perf_counter() - start
    table = layer_cost_table(case.model, {"input": (1, *case.calibration["input"].shape[1:])})
    layers = list(table)
    uniform_size = {c: configuration_cost(table, {n: c for n in layers}).size_bytes for c in ("w8a8", "w4a8")}
    # Between uniform w4a8 and w8a8: only a mix of precisions uses such a budget well.
    budget = int(uniform_size["w4a8"] + budget_fraction * (uniform_size["w8a8"] - uniform_size["w4a8"]))

    rows: list[Row] = []
    results: dict[str, PlanResult] = {}
    for method in ("hawq_v2", "interlayer"):
        request = PlanRequest(method=method, max_size_bytes=budget, seed=seed, device="cpu",
                              candidates=CANDIDATES, max_frontier_points=4, measure_uniform=(method == "hawq_v2"),
                              latency_warmup=LATENCY["warmup"], latency_repeats=LATENCY["repeats"])
        results[method] = plan(case.model, case.calibration, request, evaluation=case.evaluation,
                               sensitivity=sensitivity)
    for name in ("fp32", "w8a8", "w4a8"):
        point = results["hawq_v2"].uniform[name]
        label = "float" if name == "fp32" else f"uniform {name}"
        rows.append(Row(label, point.size_bytes, point.measured.size_bytes, point.measured.metric, 0.0,
                        point.measured.latency.p50_ms))

    randoms = random_configurations(layers, table, results["hawq_v2"].plan.size_bytes, budget, random_count, seed)
    figures = np.array([measure(case, c, float_bytes) for c in randoms], dtype=float)
    sizes = [configuration_cost(table, c).size_bytes for c in randoms]
    rows.append(Row(f"random, same size (n={len(randoms)})", float(np.mean(sizes)), figures[:, 0].mean(),
                    figures[:, 1].mean(), figures[:, 1].std(), float(np.median(figures[:, 2]))))
    rows.append(plan_row("HAWQ-V2 plan", results["hawq_v2"]))
    rows.append(plan_row("inter-layer plan", results["interlayer"]))
    note = (f"size budget {budget} B (uniform w4a8 + {budget_fraction:g} × (w8a8 − w4a8)); "
            f"sensitivity {analysis_s:.1f} s, {sensitivity.num_hvps} HVPs; layers {', '.join(layers)}")
    return rows, note


def markdown(case: Case, rows: list[Row], note: str) -> str:
    lines = [f"**{case.name}** — {note}", "",
             "| configuration | computed size (B) | artifact (B) | metric (%) | latency p50 (ms) | layers |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        metric = f"{row.metric:.2f}" + (f" ± {row.metric_std:.2f}" if row.metric_std else "")
        lines.append(f"| {row.name} | {row.size_bytes:,.0f} | {row.artifact_bytes:,.0f} | {metric} | "
                     f"{row.latency_p50_ms:.3f} | {row.note} |")
    return "\n".join(lines)


def solver_timing(seed: int) -> str:
    objective = synthetic_objective(200, CANDIDATES, seed=seed)
    start = time.perf_counter()
    frontier = diagonal_frontier(objective, "size")
    dp_s = time.perf_counter() - start
    budget = float(np.median(frontier.costs))
    start = time.perf_counter()
    solve_budget(objective, "size", budget)
    budget_s = time.perf_counter() - start
    quadratic = solve_quadratic(objective, "size", budget, time_limit=5.0)
    return "\n".join([
        "| 200 layers × 5 candidates (synthetic, seed %d) | time |" % seed,
        "|---|---:|",
        f"| whole diagonal (size, Ω) frontier, exact DP ({len(frontier)} points) | {dp_s:.2f} s |",
        f"| best Ω within the median budget, exact DP | {budget_s:.2f} s |",
        f"| least ΔL within the median budget, {quadratic.method} (relative gap {quadratic.relative_gap:.2%}) "
        f"| {quadratic.seconds:.2f} s |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", type=int, default=10, help="random configurations to average")
    parser.add_argument("--budget-fraction", type=float, default=0.25,
                        help="size budget = uniform w4a8 + this × (uniform w8a8 − uniform w4a8)")
    parser.add_argument("--transformer", action="store_true", help="also the tiny transformer block")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print(f"{cpu_description()}, torch threads {torch.get_num_threads()}, {platform.python_version()}; "
          f"latency: onnxruntime CPU, batch 1, median of {LATENCY['repeats']} runs\n")
    cases = [digits_case(args.seed)] + ([transformer_case(args.seed)] if args.transformer else [])
    for case in cases:
        rows, note = run_case(case, args.seed, args.random, args.budget_fraction)
        print(markdown(case, rows, note) + "\n", flush=True)
    print(solver_timing(args.seed))


if __name__ == "__main__":
    main()
