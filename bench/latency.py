"""Latency-table benchmark: how well the single-layer table predicts, and what the latency objective buys.

Per model, on CPU at batch 1 (``planner.latency_table``; every ratio from an interleaved run against
the float model in one process):

- the table: layers × candidates measured, the seconds it took (exports and timing);
- additivity: median and p90 of |predicted − measured| / measured latency ratio over ``--configurations``
  random configurations (each layer's candidate drawn uniformly);
- the uniform configurations' measured ratios to float (``w8a8`` etc. on every layer);
- the ``objective=latency``, ``max_drop`` bisection plan (``--max-drop``): its measured ratio to float,
  its measured drop, how many layers it quantized and how it was chosen.

Usage: ``.venv/bin/python bench/latency.py [--models digits,transformer] [--configurations 20]
[--max-drop 0.5]``; zoo models by name (``minilm-...``, ``silero-vad``; ``bash scripts/setup.sh --zoo``).
Paste the tables into docs/benchmarks.md, section "Latency table".
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ builds the models

import numpy as np

from planner.export import export_model
from planner.latency import cpu_description
from planner.latency_table import (
    TimingSettings,
    additivity_check,
    compare,
    measure_latency_table,
    random_configurations,
)
from planner.plan import normalize_for_plan, plan
from planner.request import PlanRequest

Data = Mapping[str, np.ndarray]
SMALL_CANDIDATES = ("fp32", "w8a8", "w4a8", "w8", "w4")
ZOO_CANDIDATES = ("fp32", "w8a8", "w8")


def digits() -> tuple[object, Data, Data, tuple[str, ...]]:
    from tests.models import trained_digits_onnx

    proto, calibration, data = trained_digits_onnx()
    evaluation = {"input": data.test_x[:300], "labels": data.test_y[:300]}
    return proto, {**calibration, "labels": data.train_y[:256]}, evaluation, SMALL_CANDIDATES


def transformer() -> tuple[object, Data, Data, tuple[str, ...]]:
    from sensitivity.zoo import export_tiny_transformer, trained_tiny_transformer

    model, task = trained_tiny_transformer(seed=0)
    calibration = {"input": task.train_x[:128], "labels": task.train_y[:128]}
    return export_tiny_transformer(model), calibration, {"input": task.test_x, "labels": task.test_y}, SMALL_CANDIDATES


def mixed() -> tuple[object, Data, Data, tuple[str, ...]]:
    from tests.models import latency_mixed_data, latency_mixed_model

    data = latency_mixed_data(count=8)
    return latency_mixed_model(), data, data, ("fp32", "w8a8")


def zoo(name: str) -> tuple[object, Data, Data, tuple[str, ...]]:
    import onnx

    from tests.zoo.models import get

    model = get(name)
    return onnx.load_from_string(model.model_bytes()), model.calibration(32), model.evaluation(64), ZOO_CANDIDATES


BUILDERS = {"digits": digits, "transformer": transformer, "mixed": mixed}


def run(name: str, configurations: int, max_drop: float, timing: TimingSettings) -> None:
    proto, calibration, evaluation, candidates = BUILDERS[name]() if name in BUILDERS else zoo(name)
    request = PlanRequest(
        search="bisection",
        objective="latency",
        max_drop=max_drop,
        candidates=candidates,
        device="cpu",
        measure_uniform=False,
        sensitivity_options={"trace_max_probes": 16, "trace_min_probes": 4},
    )
    normalized = normalize_for_plan(proto, calibration, request)  # type: ignore[arg-type]
    start = time.perf_counter()
    table = measure_latency_table(normalized, calibration, candidates, timing=timing)
    table_s = time.perf_counter() - start
    entries = sum(len(row) for row in table.layers.values())
    check = additivity_check(
        normalized, calibration, table, random_configurations(table, configurations, seed=0), timing=timing
    )
    uniform = [c for c in candidates if c != "fp32"]
    layers = list(table.layers)
    exports = [export_model(normalized, {layer: c for layer in layers}, calibration).model_bytes for c in uniform]
    ratios = compare(exports, normalized.model.SerializeToString(), calibration, timing)
    result = plan(normalized, calibration, request, evaluation=evaluation, latency_table=table)
    search = result.run.search
    quantized = sum(c != "fp32" for c in result.plan.configuration.values())
    drop = result.plan.measured.drop if result.plan.measured else float("nan")
    print(
        f"| {name} | {len(layers)} × {len(candidates) - 1} = {entries} | {table_s:.1f} | {table.float_p50_ms:.3f} | "
        f"{check.median_error:.1%} | {check.p90_error:.1%} | "
        + ", ".join(f"{c} {r.ratio:.2f}" for c, r in zip(uniform, ratios))
        + f" | {search.get('latency_ratio', float('nan')):.2f} | {drop:.2f} | {quantized}/{len(layers)} |",
        flush=True,
    )
    print(f"<!-- {name}: {search.get('chosen_by')} -->", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixed,digits,transformer")
    parser.add_argument("--configurations", type=int, default=20)
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    timing = TimingSettings(device="cpu", threads=args.threads)
    print(f"{cpu_description()}, batch 1, threads {args.threads or 'onnxruntime default'}\n")
    print(
        "| model | table entries | table s | float p50 ms | additivity median | p90 | uniform ratio to fp32 | "
        f"latency plan ratio | drop pp (max {args.max_drop:g}) | layers quantized |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for name in args.models.split(","):
        run(name, args.configurations, args.max_drop, timing)


if __name__ == "__main__":
    main()
