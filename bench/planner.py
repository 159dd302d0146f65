"""Planner benchmark: what the plans buy against uniform and random allocations, measured.

For the trained digits CNN and the trained tiny token transformer (``sensitivity.zoo``: int64
token ids, an embedding, one attention block, a linear head), both evaluated by top-1 accuracy
on held-out labelled samples, it measures in onnxruntime:

- float, uniform w8a8, uniform w4a8;
- at each size budget between uniform w4a8 and uniform w8a8 (``--budget-fractions``):
  random configurations within the budget and of about the HAWQ-V2 plan's size (mean ± standard
  error over ``--random`` of them, seeded), the HAWQ-V2 plan and the inter-layer plan (pareto
  search under that budget, both from one inter-layer sensitivity analysis per model);

each with the computed size, the artifact's bytes, the metric and the median latency (batch 1),
then the differences at equal size with their standard errors (plan − random: the standard error
of the random mean; inter-layer − HAWQ-V2: paired over the evaluation samples). Last, the
frontier solve time for 200 synthetic layers × 5 candidates.
Prints markdown (section "Planner" of docs/benchmarks.md).

Usage: ``.venv/bin/python bench/plans.py [--seed 0] [--random 10] [--probes 64]``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and its name would shadow the
# ``planner`` package; drop that entry before importing the package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from planner.cost import CostTable, configuration_cost, layer_cost_table, layer_size_bytes
from planner.evaluate import run_batched
from planner.export import export_model
from planner.frontier import diagonal_frontier, solve_budget
from planner.latency import cpu_description, measure_latency
from planner.objective import synthetic_objective
from planner.plan import PlanRequest, PlanResult, plan
from planner.quadratic import solve_quadratic
from sensitivity.onnx_program import load_onnx
from sensitivity.results import InterLayerConfig, SensitivityResult
from sensitivity.run import compute_sensitivity

CANDIDATES = ("fp32", "w8a8", "w4a8", "w8", "w4")
LATENCY = {"warmup": 20, "repeats": 200, "batch_size": 1, "device": "cpu"}
RANDOM_POOL = 200_000  # configurations enumerated (or sampled, for larger models) to draw from


@dataclass(frozen=True)
class Case:
    name: str
    model: onnx.ModelProto
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]  # with labels
    budget_fractions: tuple[float, ...]  # budget = uniform w4a8 + fraction × (uniform w8a8 − uniform w4a8)
    description: str


@dataclass(frozen=True)
class Row:
    name: str
    size_bytes: float  # computed (weights, scales, zero points, other initializers)
    artifact_bytes: float
    metric: float
    metric_se: float  # standard error over random configurations; 0 for a single one
    latency_p50_ms: float
    note: str = ""


def digits_case(seed: int) -> Case:
    from sensitivity.examples import export_onnx, trained_digits_cnn

    model, data = trained_digits_cnn(seed=seed)
    proto = export_onnx(model, torch.from_numpy(data.train_x[:1]))
    return Case(
        "digits CNN (top-1 accuracy, %)",
        proto,
        {"input": data.train_x[:512], "labels": data.train_y[:512]},
        {"input": data.test_x, "labels": data.test_y},
        (0.1, 0.25),
        f"calibration 512 training images, evaluation the {len(data.test_y)} held-out images",
    )


def transformer_case(seed: int, evaluation_samples: int) -> Case:
    from sensitivity.zoo import export_tiny_transformer, token_task, trained_tiny_transformer

    model, task = trained_tiny_transformer(seed=seed)
    # The task's own test split has 768 sequences (0.13 pp each); fresh sequences of the same task
    # (another seed, all held out) resolve the small differences between configurations.
    fresh = token_task(samples=evaluation_samples, test_fraction=1.0, seed=seed + 1)
    return Case(
        "tiny token transformer (top-1 accuracy, %)",
        export_tiny_transformer(model),
        {"input": task.train_x[:512], "labels": task.train_y[:512]},
        {"input": fresh.test_x, "labels": fresh.test_y},
        (0.25, 0.5),  # where random allocations of the same size spread most (w4a8 and w8a8 differ little)
        f"calibration 512 training sequences, evaluation {evaluation_samples} fresh sequences (seed {seed + 1})",
    )


def correct(model_bytes: bytes, evaluation: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-sample top-1 correctness (0/1) of a model in onnxruntime."""
    feeds = {name: array for name, array in evaluation.items() if name != "labels"}
    return (run_batched(model_bytes, feeds, 256).argmax(axis=1) == evaluation["labels"]).astype(float)


def measure(case: Case, configuration: Mapping[str, str]) -> tuple[int, np.ndarray, float]:
    """(artifact bytes, per-sample correctness, median latency ms) of one configuration."""
    exported = export_model(case.model, configuration, case.calibration)
    latency = measure_latency(exported.model_bytes, case.evaluation, **LATENCY)
    return len(exported.model_bytes), correct(exported.model_bytes, case.evaluation), latency.p50_ms


def random_configurations(table: CostTable, size: float, budget: float, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` configurations drawn uniformly from those within ``budget`` and at least 95 % of
    ``size`` (the plan's size); the ``count`` nearest to ``size`` within the budget when fewer are there."""
    rng = np.random.default_rng(seed)
    layers = list(table)
    if len(CANDIDATES) ** len(layers) <= RANDOM_POOL:
        grids = np.meshgrid(*[np.arange(len(CANDIDATES))] * len(layers), indexing="ij")
        pool = np.stack([g.ravel() for g in grids], axis=1)
    else:
        pool = rng.integers(0, len(CANDIDATES), size=(RANDOM_POOL, len(layers)))
    per_layer = np.array([[layer_size_bytes(table[name], c) for c in CANDIDATES] for name in layers], dtype=float)
    sizes = table.other_initializer_bytes + per_layer[np.arange(len(layers)), pool].sum(axis=1)
    near = np.flatnonzero((sizes <= budget) & (sizes >= 0.95 * size))
    if len(near) < count:
        distance = np.where(sizes <= budget, np.abs(sizes - size), np.inf)
        near = np.argsort(distance)[:count]
    picks = rng.choice(near, size=min(count, len(near)), replace=False)
    return [{name: CANDIDATES[k] for name, k in zip(layers, pool[p])} for p in picks]


def plan_row(name: str, result: PlanResult) -> Row:
    measured = result.plan.measured
    layers = ", ".join(result.plan.configuration.values())
    return Row(name, result.plan.size_bytes, measured.size_bytes, measured.metric, 0.0, measured.latency.p50_ms, layers)


def uniform_rows(result: PlanResult) -> list[Row]:
    rows = []
    for name in ("fp32", "w8a8", "w4a8"):
        point = result.uniform[name]
        label = "float" if name == "fp32" else f"uniform {name}"
        rows.append(Row(label, point.size_bytes, point.measured.size_bytes, point.measured.metric, 0.0,
                        point.measured.latency.p50_ms))
    return rows


def plans_at(
    case: Case, sensitivity: SensitivityResult, budget: int, seed: int, uniform: bool
) -> dict[str, PlanResult]:
    """Both methods' pareto plans under one size budget, from the same sensitivity result."""
    results = {}
    for method in ("hawq_v2", "interlayer"):
        request = PlanRequest(method=method, max_size_bytes=budget, seed=seed, device="cpu", candidates=CANDIDATES,
                              max_frontier_points=1, measure_uniform=uniform and method == "hawq_v2",
                              latency_warmup=LATENCY["warmup"], latency_repeats=LATENCY["repeats"])
        results[method] = plan(case.model, case.calibration, request, evaluation=case.evaluation,
                               sensitivity=sensitivity)
    return results


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def comparison(case: Case, results: Mapping[str, PlanResult], random_correct: np.ndarray) -> str:
    """Differences at equal size, in pp, with standard errors.

    plan − random: per sample, the plan's correctness minus the random configurations' mean; its
    standard error combines the evaluation samples' (paired) and the random configurations' spread
    (standard error of the mean of their accuracies). inter-layer − HAWQ-V2: paired over samples.
    Both plans' artifacts are run afresh; the run reproduces the reported metric exactly.
    """
    per_sample = {m: correct(r.artifact_bytes, case.evaluation) for m, r in results.items()}
    for method, result in results.items():
        assert 100.0 * float(per_sample[method].mean()) == result.plan.measured.metric, method
    _, configurations_se = mean_and_se(100.0 * random_correct.mean(axis=1))
    parts = []
    for method, label in (("hawq_v2", "HAWQ-V2"), ("interlayer", "inter-layer")):
        mean, samples_se = mean_and_se(100.0 * (per_sample[method] - random_correct.mean(axis=0)))
        parts.append(f"{label} − random {mean:+.2f} ± {np.hypot(samples_se, configurations_se):.2f} pp")
    difference = 100.0 * (per_sample["interlayer"] - per_sample["hawq_v2"])
    mean, se = mean_and_se(difference)
    parts.append(f"inter-layer − HAWQ-V2 {mean:+.2f} ± {se:.2f} pp (paired; the plans differ on "
                 f"{int((difference != 0).sum())} of {len(difference)} samples)")
    return "; ".join(parts)


def run_case(case: Case, seed: int, random_count: int, probes: int) -> tuple[list[Row], list[str], str]:
    start = time.perf_counter()
    config = InterLayerConfig(bits=(8, 4), seed=seed, trace_max_probes=probes, device="cpu")
    sensitivity = compute_sensitivity(load_onnx(case.model), case.calibration, config)
    analysis_s = time.perf_counter() - start
    sample = {name: (1, *array.shape[1:]) for name, array in case.calibration.items() if name != "labels"}
    table = layer_cost_table(case.model, sample)
    layers = list(table)
    uniform_size = {c: configuration_cost(table, {n: c for n in layers}).size_bytes for c in ("w8a8", "w4a8")}

    rows: list[Row] = []
    notes: list[str] = []
    for k, fraction in enumerate(case.budget_fractions):
        # Between uniform w4a8 and w8a8: only a mix of precisions uses such a budget well.
        budget = int(uniform_size["w4a8"] + fraction * (uniform_size["w8a8"] - uniform_size["w4a8"]))
        results = plans_at(case, sensitivity, budget, seed, uniform=k == 0)
        if k == 0:
            rows += uniform_rows(results["hawq_v2"])
        randoms = random_configurations(table, results["hawq_v2"].plan.size_bytes, budget, random_count, seed + k)
        artifact_bytes, random_correct, latencies = zip(*(measure(case, c) for c in randoms))
        random_correct = np.stack(random_correct)  # [configurations, samples]
        mean, se = mean_and_se(100.0 * random_correct.mean(axis=1))
        sizes = [configuration_cost(table, c).size_bytes for c in randoms]
        at = f"budget {budget:,} B"
        rows.append(Row(f"{at}: random, same size (n={len(randoms)})", float(np.mean(sizes)),
                        float(np.mean(artifact_bytes)), mean, se, float(np.median(latencies))))
        rows.append(plan_row(f"{at}: HAWQ-V2 plan", results["hawq_v2"]))
        rows.append(plan_row(f"{at}: inter-layer plan", results["interlayer"]))
        notes.append(f"{at} (w4a8 + {fraction:g} × (w8a8 − w4a8)): {comparison(case, results, random_correct)}")
    header = (f"{case.description}; sensitivity {analysis_s:.1f} s, {sensitivity.num_hvps} HVPs; "
              f"layers {', '.join(layers)}")
    return rows, notes, header


def markdown(case: Case, rows: Sequence[Row], notes: Sequence[str], header: str) -> str:
    lines = [f"**{case.name}** — {header}", "",
             "| configuration | computed size (B) | artifact (B) | metric (%) | latency p50 (ms) | layers |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        metric = f"{row.metric:.2f}" + (f" ± {row.metric_se:.2f}" if row.metric_se else "")
        lines.append(f"| {row.name} | {row.size_bytes:,.0f} | {row.artifact_bytes:,.0f} | {metric} | "
                     f"{row.latency_p50_ms:.3f} | {row.note} |")
    lines += [""] + [f"- {note}" for note in notes]
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
    parser.add_argument("--random", type=int, default=10, help="random configurations per budget")
    parser.add_argument("--probes", type=int, default=64, help="trace_max_probes of the sensitivity analysis")
    parser.add_argument("--token-samples", type=int, default=8192, help="evaluation sequences of the transformer")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print(f"{cpu_description()}, torch threads {torch.get_num_threads()}, {platform.python_version()}; "
          f"latency: onnxruntime CPU, batch 1, median of {LATENCY['repeats']} runs\n")
    for case in (digits_case(args.seed), transformer_case(args.seed, args.token_samples)):
        rows, notes, header = run_case(case, args.seed, args.random, args.probes)
        print(markdown(case, rows, notes, header) + "\n", flush=True)
    print(solver_timing(args.seed))
    print(f"\nwhole script {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
