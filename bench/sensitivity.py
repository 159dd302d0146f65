"""Benchmark the sensitivity analysis on two trained models (ONNX programs, as the service runs them).

    .venv/bin/python bench/sensitivity.py [--samples 256] [--rounds 3] [--probes 16] [--rse-probes 128]

Models: the trained digits CNN (``sensitivity.examples``, BatchNorm folded by the export) and
the trained tiny token transformer (``sensitivity.zoo``: embedding, attention, LayerNorm, GELU,
head). Calibration: ``--samples`` training samples with labels (cross-entropy), one batch.
One torch thread; every ratio is measured within one process, settings in round-robin, the
best of ``--rounds`` rounds each (on a shared machine the minimum is the least disturbed).

(a) time per Hutchinson probe / time of one gradient over the same batch, per HVP method and
    probes per pass; (b) speed-up of all-layers-at-once Hutchinson over a per-layer loop (one
    probe restricted to each layer in turn), same probes per layer; (c) probes needed for a 5%
    relative standard error per layer, extrapolated from ``--rse-probes`` probes (SE ∝ 1/√k);
    (d) Spearman correlations of both predictors with measured loss changes (``validate_predictions``).
"""

import sys
from pathlib import Path

# The repository root first: this folder's bench/planner.py would otherwise shadow the planner package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sensitivity import InterLayerConfig, compute_sensitivity, validate_predictions
from sensitivity.hvp import DEFAULT_METHOD, DEFAULT_PROBES_PER_PASS, HessianVectorProducts, Vector
from sensitivity.losses import CalibrationLoss
from sensitivity.onnx_program import load_onnx
from sensitivity.program import Program
from sensitivity.results import LayerTrace
from sensitivity.traces import hutchinson_traces, rademacher_probe

# (method, probes per pass, vmap-batched second backward): "double_backward" batches the
# probes' second backward with vmap where functorch can (the library default); the loop
# variant is the per-probe retained-graph backward it falls back to.
SETTINGS = (
    ("double_backward", 1, False),
    ("double_backward", 4, False),
    ("double_backward", 16, False),
    ("double_backward", 4, True),
    ("double_backward", 16, True),
    ("forward_over_reverse", 1, False),
    ("forward_over_reverse", 4, False),
    ("forward_over_reverse", 16, False),
)
TARGET_RSE = 0.05


@dataclass
class Model:
    label: str
    program: Program
    calibration: dict[str, np.ndarray]
    note: str


def digits_cnn(samples: int, seed: int) -> Model:
    from sensitivity.examples import accuracy, export_onnx, trained_digits_cnn

    model, digits = trained_digits_cnn(seed=seed)
    program = load_onnx(export_onnx(model, torch.zeros(2, 1, 8, 8)))
    test = accuracy(model, digits.test_x, digits.test_y)
    calibration = {"input": digits.train_x[:samples], "labels": digits.train_y[:samples]}
    return Model("digits CNN", program, calibration, f"test accuracy {test:.1%}")


def tiny_transformer(samples: int, seed: int) -> Model:
    from sensitivity.zoo import export_tiny_transformer, trained_tiny_transformer

    model, task = trained_tiny_transformer(seed=seed)
    program = load_onnx(export_tiny_transformer(model))
    with torch.no_grad():
        test = float((model(torch.from_numpy(task.test_x)).argmax(1).numpy() == task.test_y).mean())
    calibration = {"input": task.train_x[:samples], "labels": task.train_y[:samples]}
    return Model("tiny transformer", program, calibration, f"test accuracy {test:.1%}")


def _best_of_rounds(tasks: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Fastest of ``rounds`` round-robin runs of every task, in seconds."""
    best = {name: math.inf for name in tasks}
    for _ in range(rounds):
        for name, task in tasks.items():
            start = time.perf_counter()
            task()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


Setting = tuple[str, int, bool]


def _setting_label(setting: Setting) -> str:
    method, k, batched = setting
    if method != "double_backward" or k == 1:
        return method
    return "double_backward, vmap-batched" if batched else "double_backward, loop"


def probe_cost(loss: CalibrationLoss, rounds: int) -> tuple[float, dict[Setting, float | str]]:
    """(a) Seconds per gradient, and per setting the seconds per probe over that (or why it did not run)."""
    generator = torch.Generator().manual_seed(0)
    point = HessianVectorProducts(loss).point
    probes = [rademacher_probe(point, generator) for _ in range(16)]
    tasks: dict[Setting | str, Callable[[], object]] = {"gradient": HessianVectorProducts(loss).gradient}
    for setting in SETTINGS:
        method, k, batched = setting
        hvp = HessianVectorProducts(loss, method=method, probes_per_pass=k)
        hvp.batched_backward = batched
        hvp.many(probes[:k])  # warm-up; a batched setting vmap cannot run has fallen back by now
        if hvp.batched_backward == batched:
            tasks[setting] = lambda hvp=hvp: hvp.many(probes)
    seconds = _best_of_rounds(tasks, rounds)
    gradient = seconds.pop("gradient")
    ratios: dict[Setting, float | str] = {
        s: seconds[s] / len(probes) / gradient if s in seconds else "n/a: vmap lacks a rule (falls back to the loop)"
        for s in SETTINGS
    }
    return gradient, ratios


def per_layer_loop_traces(hvp: HessianVectorProducts, probes: int, seed: int) -> list[float]:
    """The baseline of (b): for each layer in turn, ``probes`` Rademacher probes that are zero
    outside that layer; Tr(Hᵢᵢ) ≈ mean of vᵢᵀ(Hv)ᵢ. One HVP per probe per layer."""
    generator = torch.Generator().manual_seed(seed)
    traces = []
    for i in range(len(hvp.point)):
        vectors: list[Vector] = []

        def restricted(_: int, i: int = i, vectors: list[Vector] = vectors) -> Vector:
            v = rademacher_probe(hvp.point, generator)
            vectors.append(tuple(t if j == i else torch.zeros_like(t) for j, t in enumerate(v)))
            return vectors[-1]

        samples = [float((vectors[k][i].double() * hv[i].double()).sum()) for k, hv in hvp.map(restricted, probes)]
        traces.append(float(np.mean(samples)))
    return traces


def all_layers_traces(hvp: HessianVectorProducts, probes: int, seed: int):
    """Hutchinson over all layers at once with exactly ``probes`` probes (no early stop)."""
    return hutchinson_traces(hvp, seed=seed, tolerance=1e-12, min_probes=probes, max_probes=probes)


def layer_loop_speedup(loss: CalibrationLoss, probes: int, rounds: int) -> tuple[float, int]:
    """(b) Time of the per-layer loop / time of all-layers-at-once, same probes per layer."""
    hvp = HessianVectorProducts(loss)
    seconds = _best_of_rounds(
        {
            "all": lambda: all_layers_traces(hvp, probes, seed=1),
            "loop": lambda: per_layer_loop_traces(hvp, probes, seed=1),
        },
        rounds,
    )
    return seconds["loop"] / seconds["all"], len(hvp.point)


def probes_for_target(loss: CalibrationLoss, probes: int) -> list[tuple[LayerTrace, int]]:
    """(c) Per layer: the trace after ``probes`` probes and the probes a 5% relative SE needs
    (SE ∝ 1/√k, so k·(SE/|Tr| / 0.05)²)."""
    traces = all_layers_traces(HessianVectorProducts(loss), probes, seed=2)
    return [(t, math.ceil(probes * (t.relative_standard_error / TARGET_RSE) ** 2)) for t in traces]


def spearman(model: Model, seed: int, trace_probes: int) -> dict[str, tuple[float, float, int]]:
    """(d) Per group: Spearman of the inter-layer and the diagonal (½Ω) predictor, and the count."""
    samples = len(model.calibration["input"])
    config = InterLayerConfig(seed=seed, bits=(8, 4), trace_max_probes=trace_probes, batch_size=samples, device="cpu")
    result = compute_sensitivity(model.program, model.calibration, config)
    report = validate_predictions(model.program, model.calibration, result, num_random=64, max_pairs=64, seed=seed)
    return {g.group: (g.spearman_interlayer, g.spearman_diagonal, g.count) for g in report.groups}


def _ratio(value: float | str) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="calibration samples (one batch)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (best of)")
    parser.add_argument("--probes", type=int, default=16, help="probes per layer in (b)")
    parser.add_argument("--rse-probes", type=int, default=128, help="probes behind the estimate in (c)")
    parser.add_argument("--trace-probes", type=int, default=64, help="trace probe cap in (d)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # on shared cores more threads only spin against other jobs
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} torch thread, torch {torch.__version__}, seed {args.seed}, "
        f"{args.samples} calibration samples in one batch, default HVP {DEFAULT_METHOD} x {DEFAULT_PROBES_PER_PASS}"
    )
    summary = []
    for build in (digits_cnn, tiny_transformer):
        model = build(args.samples, args.seed)
        loss = CalibrationLoss(model.program, model.calibration, args.samples, torch.device("cpu"))
        weights = sum(layer.num_params for layer in model.program.layers)
        print(
            f"\n### {model.label}: {len(model.program.layers)} layers, {weights} layer weights, "
            f"{model.note}, L(W0) = {loss.value():.4f}\n"
        )
        gradient, ratios = probe_cost(loss, args.rounds)
        print(f"(a) one gradient: {gradient * 1000:.1f} ms\n")
        print("| HVP method | probes per pass | time per probe / time per gradient |")
        print("|---|---:|---:|")
        for setting, value in ratios.items():
            print(f"| {_setting_label(setting)} | {setting[1]} | {_ratio(value)} |")
        speedup, layers = layer_loop_speedup(loss, args.probes, args.rounds)
        print(
            f"\n(b) all layers at once vs per-layer loop, {args.probes} probes per layer: "
            f"speed-up {speedup:.2f} (target >= 0.8 x {layers} layers = {0.8 * layers:.1f})\n"
        )
        rows = probes_for_target(loss, args.rse_probes)
        print(f"(c) relative SE after {args.rse_probes} probes and probes needed for {TARGET_RSE:.0%}:\n")
        print("| layer | trace ± SE | relative SE | probes for 5% |")
        print("|---|---:|---:|---:|")
        for trace, needed in rows:
            print(
                f"| {trace.name} | {trace.trace:.4g} ± {trace.standard_error:.2g} "
                f"| {trace.relative_standard_error:.3f} | {needed} |"
            )
        groups = spearman(model, args.seed, args.trace_probes)
        print(f"\n(d) Spearman with measured loss changes (trace cap {args.trace_probes}, 64 random configurations):\n")
        print("| group | configurations | inter-layer | diagonal ½Ω |")
        print("|---|---:|---:|---:|")
        for group, (inter, diag, count) in groups.items():
            print(f"| {group} | {count} | {inter:.3f} | {diag:.3f} |")
        summary.append((model.label, layers, gradient, ratios, speedup, max(n for _, n in rows), groups["random"]))
        print(flush=True)
    print("\n### Summary\n")
    print(
        "| model | layers | gradient (ms) | probe / gradient: plain HVP | default (batched, 4 per pass) "
        "| best batched | all-at-once speed-up (target) | probes for 5% (worst layer) "
        "| Spearman random, inter-layer | Spearman random, diagonal ½Ω |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, layers, gradient, ratios, speedup, needed, (inter, diag, _) in summary:
        numbers = {s: v for s, v in ratios.items() if isinstance(v, float) and s[1] > 1}
        best = min(numbers, key=numbers.get)
        default = ratios[(DEFAULT_METHOD, DEFAULT_PROBES_PER_PASS, True)]
        if not isinstance(default, float):  # where vmap lacks a rule the library loops
            default = ratios[(DEFAULT_METHOD, DEFAULT_PROBES_PER_PASS, False)]
        print(
            f"| {label} | {layers} | {gradient * 1000:.1f} | {_ratio(ratios[('double_backward', 1, False)])} "
            f"| {_ratio(default)} | {numbers[best]:.2f} ({_setting_label(best)}, {best[1]}) "
            f"| {speedup:.2f} ({0.8 * layers:.1f}) | {needed} | {inter:.3f} | {diag:.3f} |"
        )


if __name__ == "__main__":
    main()
