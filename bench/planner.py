"""Planner benchmark: what the plans buy against uniform and random allocations, measured.

For the trained digits CNN and the trained tiny token transformer (``sensitivity.zoo``: int64
token ids, an embedding, one attention block, a linear head; on ``HARD_TOKEN_TASK``, and
calibrated once on held-out and once on training sequences), all evaluated by top-1 accuracy on
held-out labelled samples, it measures in onnxruntime:

- float, uniform w8a8, uniform w4a8;
- at each size budget between uniform w4a8 and uniform w8a8 (each case's fractions):
  random configurations within the budget and of about the HAWQ-V2 plan's size (mean ± standard
  error over ``--random`` of them, seeded), the HAWQ-V2 plan and the inter-layer plan (pareto
  search under that budget, both from one inter-layer sensitivity analysis per model);

each with the computed size, the artifact's bytes, the metric (top-1 accuracy), the change of the
evaluation cross-entropy against the float model (ΔCE: the loss the Hessian terms predict) and the
KL divergence from the float model's outputs, and the median latency (batch 1); then, for each of
the three figures, the differences at equal size with their standard errors (plan − random:
samples paired, plus the spread of the random configurations; inter-layer − HAWQ-V2: paired over
the evaluation samples). The digits CNN runs as 4-fold cross-validation (one CNN per fold, each
evaluated on its own held-out quarter of the data): fold 0's table in full, then each difference
pooled over the folds. Last, the frontier solve time for 200 synthetic layers × 5 candidates.
Prints markdown (section "Planner" of docs/benchmarks.md).

Usage: ``.venv/bin/python bench/planner.py [--seed 0] [--random 10] [--probes 64]``.
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

from planner import PlanRequest, PlanResult, plan
from planner.cost import CostTable, configuration_cost, layer_cost_table, layer_size_bytes
from planner.evaluate import log_softmax, run_batched
from planner.export import export_model
from planner.frontier import diagonal_frontier, solve_budget
from planner.latency import cpu_description, measure_latency
from planner.objective import synthetic_objective
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
    loss_change: float  # millinats, mean over the evaluation set
    kl: float  # millinats
    note: str = ""


DIGITS_FOLDS = 4  # cross-validation: four CNNs, each evaluated on its own quarter of the digits


def digits_case(seed: int, fold: int = 0) -> Case:
    from sensitivity.examples import export_onnx, trained_digits_cnn

    model, data = trained_digits_cnn(seed=seed, fold=fold)
    proto = export_onnx(model, torch.from_numpy(data.train_x[:1]))
    return Case(
        f"digits CNN, fold {fold} (top-1 accuracy, %)",
        proto,
        {"input": data.train_x[:512], "labels": data.train_y[:512]},
        {"input": data.test_x, "labels": data.test_y},
        (0.1, 0.25),
        f"calibration 512 training images, evaluation the {len(data.test_y)} held-out images",
    )


TRANSFORMER_CALIBRATION = 2048  # sequences


def transformer_case(seed: int, evaluation_samples: int, calibration: str) -> Case:
    """``calibration``: ``held-out`` (fresh sequences the model never saw) or ``training``."""
    from sensitivity.zoo import HARD_TOKEN_TASK, export_tiny_transformer, trained_tiny_transformer

    spec = HARD_TOKEN_TASK  # on the default task uniform w4a8 loses ~0.1 pp: accuracy tells nothing apart
    model, task = trained_tiny_transformer(seed=seed, spec=spec)
    count = TRANSFORMER_CALIBRATION
    if calibration == "held-out":
        held_out = spec.task(seed=seed + 2, samples=count, test_fraction=1.0)
        calibration_x, calibration_y = held_out.test_x, held_out.test_y
    else:
        calibration_x, calibration_y = task.train_x[:count], task.train_y[:count]
    # Fresh sequences (another seed) resolve small differences better than the task's test split.
    fresh = spec.task(seed=seed + 1, samples=evaluation_samples, test_fraction=1.0)
    return Case(
        f"tiny token transformer, {spec.classes} classes over {spec.tokens} tokens, {calibration} calibration "
        "(top-1 accuracy, %)",
        export_tiny_transformer(model),
        {"input": calibration_x, "labels": calibration_y},
        {"input": fresh.test_x, "labels": fresh.test_y},
        (0.25, 0.5, 0.75),
        f"trained on {len(task.train_y)} sequences of a {spec.vocab}-token vocabulary; calibration {count} "
        + (f"fresh sequences (seed {seed + 2})" if calibration == "held-out" else "training sequences")
        + f"; evaluation {evaluation_samples} fresh sequences (seed {seed + 1})",
    )


@dataclass(frozen=True)
class PerSample:
    """One configuration's per-sample figures on the evaluation set."""

    correct: np.ndarray  # top-1 correct, 0/1
    loss_change: np.ndarray  # cross-entropy with the labels minus the float model's, nats
    kl: np.ndarray  # KL(softmax(float) ‖ softmax(quantized)), nats

    def metric(self, name: str) -> np.ndarray:
        """Per-sample values in the units the tables print: pp, and millinats for the losses."""
        return 100.0 * self.correct if name == "accuracy" else 1000.0 * getattr(self, name)


def logits(model_bytes: bytes, case: Case) -> np.ndarray:
    feeds = {name: array for name, array in case.evaluation.items() if name != "labels"}
    return run_batched(model_bytes, feeds, 256)


def per_sample(model_bytes: bytes, case: Case, reference: np.ndarray) -> PerSample:
    """Per-sample figures of a model in onnxruntime; ``reference`` = the float model's logits."""
    labels = case.evaluation["labels"]
    logp, logp_float = log_softmax(logits(model_bytes, case)), log_softmax(reference)
    rows = np.arange(len(labels))
    return PerSample(
        correct=(logp.argmax(axis=1) == labels).astype(float),
        loss_change=logp_float[rows, labels] - logp[rows, labels],
        kl=(np.exp(logp_float) * (logp_float - logp)).sum(axis=1),
    )


def measure(case: Case, configuration: Mapping[str, str], reference: np.ndarray) -> tuple[int, PerSample, float]:
    """(artifact bytes, per-sample figures, median latency ms) of one configuration."""
    exported = export_model(case.model, configuration, case.calibration)
    latency = measure_latency(exported.model_bytes, case.evaluation, **LATENCY)
    return len(exported.model_bytes), per_sample(exported.model_bytes, case, reference), latency.p50_ms


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


def plan_row(name: str, result: PlanResult, figures: PerSample) -> Row:
    measured = result.plan.measured
    layers = ", ".join(result.plan.configuration.values())
    return Row(
        name,
        result.plan.size_bytes,
        measured.size_bytes,
        measured.metric,
        0.0,
        measured.latency.p50_ms,
        *_losses(figures),
        layers,
    )


def _losses(figures: PerSample) -> tuple[float, float]:
    return float(figures.metric("loss_change").mean()), float(figures.metric("kl").mean())


def uniform_rows(result: PlanResult, case: Case, reference: np.ndarray) -> list[Row]:
    rows = []
    for name in ("fp32", "w8a8", "w4a8"):
        point = result.uniform[name]
        label = "float" if name == "fp32" else f"uniform {name}"
        exported = export_model(case.model, point.configuration, case.calibration)
        rows.append(
            Row(
                label,
                point.size_bytes,
                point.measured.size_bytes,
                point.measured.metric,
                0.0,
                point.measured.latency.p50_ms,
                *_losses(per_sample(exported.model_bytes, case, reference)),
            )
        )
    return rows


def plans_at(
    case: Case, sensitivity: SensitivityResult, budget: int, seed: int, uniform: bool
) -> dict[str, PlanResult]:
    """Both methods' pareto plans under one size budget, from the same sensitivity result."""
    results = {}
    for method in ("hawq_v2", "interlayer"):
        request = PlanRequest(
            method=method,
            max_size_bytes=budget,
            seed=seed,
            device="cpu",
            candidates=CANDIDATES,
            max_frontier_points=1,
            measure_uniform=uniform and method == "hawq_v2",
            latency_warmup=LATENCY["warmup"],
            latency_repeats=LATENCY["repeats"],
        )
        results[method] = plan(
            case.model, case.calibration, request, evaluation=case.evaluation, sensitivity=sensitivity
        )
    return results


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


FIGURES = (("accuracy", "accuracy", "pp", +1), ("loss_change", "ΔCE", "mnat", -1), ("kl", "KL", "mnat", -1))


PLAN_NAMES = (("hawq_v2", "HAWQ-V2"), ("interlayer", "inter-layer"))
Differences = dict[tuple[str, str], tuple[float, float]]  # (figure, "HAWQ-V2 − random", ...) -> (mean, SE)


def differences(
    results: Mapping[str, PlanResult], plans: Mapping[str, PerSample], randoms: Sequence[PerSample]
) -> Differences:
    """Differences at equal size with standard errors, per figure.

    plan − random: per sample, the plan's value minus the random configurations' mean; its standard
    error combines the evaluation samples' (paired) and the random configurations' spread (standard
    error of the mean of their means). inter-layer − HAWQ-V2: paired over samples.
    """
    for method, result in results.items():  # the artifacts, run afresh, reproduce the reported metric
        assert 100.0 * float(plans[method].correct.mean()) == result.plan.measured.metric, method
    found: Differences = {}
    for figure, *_ in FIGURES:
        random_values = np.stack([r.metric(figure) for r in randoms])  # [configurations, samples]
        _, configurations_se = mean_and_se(random_values.mean(axis=1))
        for method, name in PLAN_NAMES:
            mean, samples_se = mean_and_se(plans[method].metric(figure) - random_values.mean(axis=0))
            found[figure, f"{name} − random"] = (mean, float(np.hypot(samples_se, configurations_se)))
        found[figure, "inter-layer − HAWQ-V2"] = mean_and_se(
            plans["interlayer"].metric(figure) - plans["hawq_v2"].metric(figure)
        )
    return found


def comparison_lines(found: Differences) -> list[str]:
    """One line per figure, ending with which plan is better than random by more than two SE."""
    lines = []
    for figure, label, unit, sign in FIGURES:
        parts = [
            f"{name} {mean:+.3g} ± {se:.2g}" + (" (paired)" if "random" not in name else "")
            for (f, name), (mean, se) in found.items()
            if f == figure
        ]
        better = [
            name
            for _, name in PLAN_NAMES
            if sign * found[figure, f"{name} − random"][0] > 2 * found[figure, f"{name} − random"][1]
        ]
        lines.append(
            f"{label} ({unit}, {'higher' if sign > 0 else 'lower'} is better): {'; '.join(parts)}; "
            f"better than random by > 2 SE: {', '.join(better) or 'neither'}"
        )
    return lines


def pooled(per_fold: Sequence[Mapping[float, Differences]]) -> str:
    """Cross-validation: each difference averaged over the folds (independent test sets), its
    standard error √(Σ SE²)/K, and in how many folds the plan was ahead."""
    labels = {figure: (label, unit, sign) for figure, label, unit, sign in FIGURES}
    lines = ["| budget | figure | comparison | mean ± SE over folds | folds ahead |", "|---|---|---|---:|---:|"]
    for fraction, found in per_fold[0].items():
        for figure, name in found:  # figure by figure, as ``differences`` filled it
            label, unit, sign = labels[figure]
            values = [fold[fraction][figure, name] for fold in per_fold]
            mean = float(np.mean([m for m, _ in values]))
            se = float(np.sqrt(sum(e**2 for _, e in values))) / len(values)
            ahead = sum(sign * m > 0 for m, _ in values)
            lines.append(
                f"| w4a8 + {fraction:g} × (w8a8 − w4a8) | {label} ({unit}) | {name} | "
                f"{mean:+.3g} ± {se:.2g} | {ahead} of {len(values)} |"
            )
    return "\n".join(lines)


def run_case(
    case: Case, seed: int, random_count: int, probes: int
) -> tuple[list[Row], list[str], str, dict[float, Differences]]:
    start = time.perf_counter()
    config = InterLayerConfig(bits=(8, 4), seed=seed, trace_max_probes=probes, device="cpu")
    sensitivity = compute_sensitivity(load_onnx(case.model), case.calibration, config)
    analysis_s = time.perf_counter() - start
    sample = {name: (1, *array.shape[1:]) for name, array in case.calibration.items() if name != "labels"}
    table = layer_cost_table(case.model, sample)
    layers = list(table)
    uniform_size = {c: configuration_cost(table, {n: c for n in layers}).size_bytes for c in ("w8a8", "w4a8")}

    reference = logits(case.model.SerializeToString(), case)
    rows: list[Row] = []
    notes: list[str] = []
    found: dict[float, Differences] = {}
    for k, fraction in enumerate(case.budget_fractions):
        # Between uniform w4a8 and w8a8: only a mix of precisions uses such a budget well.
        budget = int(uniform_size["w4a8"] + fraction * (uniform_size["w8a8"] - uniform_size["w4a8"]))
        results = plans_at(case, sensitivity, budget, seed, uniform=k == 0)
        if k == 0:
            rows += uniform_rows(results["hawq_v2"], case, reference)
        randoms = random_configurations(table, results["hawq_v2"].plan.size_bytes, budget, random_count, seed + k)
        artifact_bytes, random_figures, latencies = zip(*(measure(case, c, reference) for c in randoms))
        mean, se = mean_and_se(np.array([r.metric("accuracy").mean() for r in random_figures]))
        losses = np.array([_losses(r) for r in random_figures]).mean(axis=0)
        sizes = [configuration_cost(table, c).size_bytes for c in randoms]
        at = f"budget {budget:,} B"
        rows.append(
            Row(
                f"{at}: random, same size (n={len(randoms)})",
                float(np.mean(sizes)),
                float(np.mean(artifact_bytes)),
                mean,
                se,
                float(np.median(latencies)),
                *losses,
            )
        )
        plans = {m: per_sample(r.artifact_bytes, case, reference) for m, r in results.items()}
        rows.append(plan_row(f"{at}: HAWQ-V2 plan", results["hawq_v2"], plans["hawq_v2"]))
        rows.append(plan_row(f"{at}: inter-layer plan", results["interlayer"], plans["interlayer"]))
        notes.append(f"- {at} (w4a8 + {fraction:g} × (w8a8 − w4a8)):")
        found[fraction] = differences(results, plans, random_figures)
        notes += [f"  - {line}" for line in comparison_lines(found[fraction])]
    header = (
        f"{case.description}; sensitivity {analysis_s:.1f} s, {sensitivity.num_hvps} HVPs; layers {', '.join(layers)}"
    )
    return rows, notes, header, found


def markdown(case: Case, rows: Sequence[Row], notes: Sequence[str], header: str) -> str:
    lines = [
        f"**{case.name}** — {header}",
        "",
        "| configuration | computed size (B) | artifact (B) | accuracy (%) | ΔCE (mnat) | KL (mnat) "
        "| latency p50 (ms) | layers |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        metric = f"{row.metric:.2f}" + (f" ± {row.metric_se:.2f}" if row.metric_se else "")
        lines.append(
            f"| {row.name} | {row.size_bytes:,.0f} | {row.artifact_bytes:,.0f} | {metric} | "
            f"{row.loss_change:.3f} | {row.kl:.3f} | {row.latency_p50_ms:.3f} | {row.note} |"
        )
    lines += ["", *notes]
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
    return "\n".join(
        [
            f"| 200 layers × 5 candidates (synthetic, seed {seed}) | time |",
            "|---|---:|",
            f"| whole diagonal (size, Ω) frontier, exact DP ({len(frontier)} points) | {dp_s:.2f} s |",
            f"| best Ω within the median budget, exact DP | {budget_s:.2f} s |",
            f"| least ΔL within the median budget, {quadratic.method} (relative gap {quadratic.relative_gap:.2%}) "
            f"| {quadratic.seconds:.2f} s |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", type=int, default=10, help="random configurations per budget")
    parser.add_argument("--probes", type=int, default=64, help="trace_max_probes of the sensitivity analysis")
    parser.add_argument("--token-samples", type=int, default=8192, help="evaluation sequences of the transformer")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print(
        f"{cpu_description()}, torch threads {torch.get_num_threads()}, {platform.python_version()}; "
        f"latency: onnxruntime CPU, batch 1, median of {LATENCY['repeats']} runs\n"
    )
    folds, accuracies = [], []
    for fold in range(DIGITS_FOLDS):  # fold 0's table in full, then all folds pooled
        case = digits_case(args.seed, fold)
        rows, notes, header, found = run_case(case, args.seed, args.random, args.probes)
        folds.append(found)
        accuracies.append("/".join(f"{row.metric:.2f}" for row in rows[:3]))  # float, uniform w8a8, w4a8
        if fold == 0:
            print(markdown(case, rows, notes, header) + "\n", flush=True)
    print(
        f"**digits CNN, {DIGITS_FOLDS}-fold cross-validation** (one CNN per fold, each evaluated on its "
        f"held-out quarter: {DIGITS_FOLDS} × 450 images; accuracy float / uniform w8a8 / uniform w4a8 by fold: "
        f"{', '.join(accuracies)} %)\n\n{pooled(folds)}\n",
        flush=True,
    )
    for calibration in ("held-out", "training"):
        case = transformer_case(args.seed, args.token_samples, calibration)
        rows, notes, header, _ = run_case(case, args.seed, args.random, args.probes)
        print(markdown(case, rows, notes, header) + "\n", flush=True)
    print(solver_timing(args.seed))
    print(f"\nwhole script {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
