"""Realistic rows for the dashboard tests, inserted with the app's own sessions and store.

A small CNN with five layers, its calibration set, three stored sensitivity results in the
shape of ``sensitivity.results.SensitivityResult.to_dict()`` (HAWQ-V2 traces, HAWQ-V1
eigenvalues, inter-layer G), a Pareto plan with frontier points whose figures follow from
the per-layer numbers, an artifact blob per point, latency measurements on two devices, a plan on
latency (its latency table stored too, every point timed interleaved with the float model, two
slower than it, fp32 and fp16 baselines), and
jobs in every interesting state: succeeded, failed and one running (kept alive by
``StandInWorker``).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np

from service.job_status import JobStatus
from service.jobs.executor import worker_id
from service.store.tables import (
    Artifact,
    Dataset,
    FrontierPointRow,
    Job,
    LatencyMeasurementRow,
    LatencyTableRow,
    Model,
    Plan,
    SensitivityResultRow,
    new_id,
    utcnow,
)

# name, op type, weight shape, output positions per sample (MACs = params × positions)
LAYERS = [
    ("conv1.weight", "Conv", [16, 3, 3, 3], 32 * 32),
    ("layer1.conv.weight", "Conv", [16, 16, 3, 3], 32 * 32),
    ("layer2.conv.weight", "Conv", [32, 16, 3, 3], 16 * 16),
    ("layer3.conv.weight", "Conv", [64, 32, 3, 3], 8 * 8),
    ("fc.weight", "Gemm", [10, 64], 1),
]
AVERAGE_TRACES = [2.1e-1, 8.3e-2, 3.1e-2, 9.0e-3, 4.4e-2]  # Tr(Hᵢ)/nᵢ
EIGENVALUES = [3.92, 1.87, 0.94, 0.31, 1.12]
CANDIDATE_BITS = {"fp32": (32, 32), "w8a8": (8, 8), "w4a8": (4, 8)}  # (weight, activation) bits
DELTA_SQUARED_PER_PARAM = {"fp32": 0.0, "w8a8": 2.4e-6, "w4a8": 7.9e-4}  # ‖Δᵢᵇ‖² / nᵢ
FLOAT_METRIC = 98.44  # top-1 accuracy of the float model, percent
CPU = "Intel(R) Xeon(R) Platinum 8480+, 16 cores"
VERSIONS = {"mpq": "0.1.0", "torch": "2.13.0", "onnx": "1.19.0", "onnxruntime": "1.23.0"}

# Frontier points by index: per-layer candidates in graph order. Point 0 was not measured and
# has no artifact (the planner measures and exports only some points).
FRONTIER = [
    ["fp32"] * 5,
    ["w8a8"] * 5,
    ["w8a8", "w8a8", "w4a8", "w4a8", "w8a8"],
    ["w8a8", "w4a8", "w4a8", "w4a8", "w8a8"],
    ["w8a8", "w4a8", "w4a8", "w4a8", "w4a8"],
]
UNMEASURED_POINT = 0
CHOSEN_POINT = 3
MAX_DROP = 1.0

# The bisection plan (planner.choose.bisection): demote fp32 -> w4a8 in order of Ω per byte saved,
# within BISECTION_MAX_DROP. It measures k = 5 (drop 0.978), k = 2 (0.488, within), k = 3 (0.532,
# out) and chooses k = 2; its points are those steps, most demoted first.
DEMOTION_ORDER = ["layer3.conv.weight", "layer2.conv.weight", "fc.weight", "layer1.conv.weight", "conv1.weight"]
BISECTION_STEPS = [5, 3, 2]  # k of frontier point 0, 1, 2
BISECTION_CHOSEN = 2  # the point index of k = 2
BISECTION_MAX_DROP = 0.5


# The plan's latency measurements: minutes ago, device, provider, batch size, mean in ms.
LATENCY_RUNS = [
    (49, CPU, "CPUExecutionProvider", 1, 0.84),
    (48, CPU, "CPUExecutionProvider", 8, 3.91),
    (20, "NVIDIA H100 80GB HBM3", "CUDAExecutionProvider", 1, 0.19),
]


def latency_percentiles(mean: float) -> tuple[float, float]:
    """(p50, p90) of a latency measurement row with this mean: a right-skewed spread, as timings have."""
    return round(mean * 0.97, 3), round(mean * 1.12, 3)


def num_params(shape: list[int]) -> int:
    return int(np.prod(shape))


def node_of(name: str, op: str) -> tuple[str, str]:
    """(node name, scope) as a TorchScript export writes them: layer3.conv.weight -> /layer3/conv/Conv."""
    scope = "/" + name.removesuffix(".weight").replace(".", "/")
    return f"{scope}/{op}", scope


def layer_rows() -> list[dict[str, Any]]:
    """Model.layers as the inspector stores them."""
    return [
        {
            "name": name,
            "op_type": op,
            "node_name": node_of(name, op)[0],
            "scope": node_of(name, op)[1],
            "shape": shape,
            "num_params": num_params(shape),
        }
        for name, op, shape, _ in LAYERS
    ]


# ---------------------------------------------------------------- sensitivity result dicts


def _base_result(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": config,
        "layers": [
            {
                "name": name,
                "op_type": op,
                "shape": shape,
                "num_params": num_params(shape),
                "channel_axis": 0,
                "node_name": node_of(name, op)[0],
                "scope": node_of(name, op)[1],
            }
            for name, op, shape, _ in LAYERS
        ],
        "loss_kind": "cross_entropy",
        "loss_reason": "labels given: cross-entropy with them",
        "loss": 0.0571,
        "num_samples": 512,
        "traces": None,
        "eigenvalues": None,
        "interlayer": None,
        "fisher": None,
        "measured": None,
        "timings": {"load": 0.41, "traces": 12.8},
        "num_hvps": 256,
        "seed": 0,
        "versions": dict(VERSIONS),
        "device": "cpu",
        "normalization": {
            "promoted_constants": 0,
            "dynamic_dims": [],
            "source_opset": 17,
            "opset": 17,
            "upgrade_check": None,
            "changes": [],
        },
        "execution": {
            "batch_size": 128,
            "probes_per_pass": 4,
            "hvp_method": "double_backward",
            "budget": {"adapted": True, "memory_budget_mb": 4096, "predicted_peak_mb": 1830.0},
            "traces": {"stopped": "converged", "probes": 64, "worst_relative_se": 0.048},
            "peak_rss_mb": 1722.5,
            "gradient_s": 0.8,
            "probe_cost_gradients": 2.1,
        },
    }


def _shared_config(kind: str) -> dict[str, Any]:
    return {
        "type": kind,
        "seed": 0,
        "batch_size": 256,
        "device": "auto",
        "task": "auto",
        "hvp_method": "double_backward",
        "probes_per_pass": 4,
        "memory_budget_mb": 4096,
        "time_budget_s": None,
    }


def trace_records() -> list[dict[str, Any]]:
    records = []
    for (name, _, shape, _), average, relative_se in zip(LAYERS, AVERAGE_TRACES, [0.031, 0.044, 0.038, 0.071, 0.026]):
        n = num_params(shape)
        trace = average * n
        records.append(
            {
                "name": name,
                "num_params": n,
                "trace": trace,
                "standard_error": relative_se * trace,
                "num_probes": 64,
                "average_trace": trace / n,
            }
        )
    return records


def hawq_v2_result() -> dict[str, Any]:
    config = {**_shared_config("TraceConfig"), "tolerance": 0.05, "min_probes": 8, "max_probes": 256}
    return {**_base_result(config), "traces": trace_records()}


def hawq_v1_result() -> dict[str, Any]:
    config = {**_shared_config("EigenConfig"), "tolerance": 1e-4, "max_iterations": 100}
    eigen = [
        {"name": name, "eigenvalue": value, "iterations": 17 + i, "converged": True, "relative_change": 6.1e-5}
        for i, ((name, *_), value) in enumerate(zip(LAYERS, EIGENVALUES))
    ]
    return {**_base_result(config), "eigenvalues": eigen, "num_hvps": 98}


def interlayer_result(bits: tuple[int, ...] = (8, 4)) -> dict[str, Any]:
    """G built like the real thing: diagonal blocks from the traces, smaller symmetric cross terms."""
    config = {
        **_shared_config("InterLayerConfig"),
        "bits": list(bits),
        "trace_tolerance": 0.05,
        "trace_min_probes": 8,
        "trace_max_probes": 256,
    }
    per_bits = {8: DELTA_SQUARED_PER_PARAM["w8a8"], 4: DELTA_SQUARED_PER_PARAM["w4a8"]}
    labels = [(name, b) for name, *_ in LAYERS for b in bits]  # layers outermost, as sensitivity does
    norms = [num_params(LAYERS[i // len(bits)][2]) * per_bits[b] for i, (_, b) in enumerate(labels)]
    omega = [AVERAGE_TRACES[i // len(bits)] * norm for i, norm in enumerate(norms)]
    rng = np.random.default_rng(7)
    scale = np.sqrt(np.outer(omega, omega))
    matrix = 0.3 * scale * rng.uniform(-1, 1, scale.shape)
    matrix = (matrix + matrix.T) / 2
    np.fill_diagonal(matrix, 2 * np.asarray(omega))
    gradient = (rng.normal(0, 1, len(labels)) * np.sqrt(omega) * 0.05).tolist()
    errors = (np.abs(gradient) * rng.uniform(0.3, 2.0, len(labels))).tolist()  # half the terms within their error
    interlayer = {
        "labels": [[name, b] for name, b in labels],
        "matrix": matrix.tolist(),
        "gradient_terms": gradient,
        "delta_norms_squared": norms,
        "omega": omega,
        "symmetry_error": 3.2e-7,
        "gradient_term_errors": errors,
    }
    return {**_base_result(config), "traces": trace_records(), "interlayer": interlayer, "num_hvps": 266}


# ---------------------------------------------------------------- plan figures


def configuration(candidates: list[str]) -> dict[str, str]:
    return {name: candidate for (name, *_), candidate in zip(LAYERS, candidates)}


def point_figures(candidates: list[str]) -> dict[str, Any]:
    """Size, BOPS, Ω, ΔL, latency and metric of a configuration, all from the per-layer numbers."""
    size = bops = omega = 0.0
    for (_, _, shape, positions), average, candidate in zip(LAYERS, AVERAGE_TRACES, candidates):
        n = num_params(shape)
        weight_bits, activation_bits = CANDIDATE_BITS[candidate]
        size += n * weight_bits / 8
        bops += n * positions * weight_bits * activation_bits
        omega += average * n * DELTA_SQUARED_PER_PARAM[candidate]
    drop = round(omega * 2.0, 3)  # measured drops track the prediction, as on a real model
    return {
        "size_bytes": int(size),
        "bops": int(bops),
        "omega": omega,
        "loss_change": omega * 1.07,
        "latency_ms": round(0.21 + bops * 1.1e-9, 4),
        "metric": round(FLOAT_METRIC - drop, 3),
        "drop": drop,
    }


def measurement(figures: dict[str, Any]) -> dict[str, Any]:
    """planner.plan.Measurement.to_dict()."""
    mean = figures["latency_ms"]
    return {
        "metric_name": "top1_accuracy",
        "metric": figures["metric"],
        "baseline": FLOAT_METRIC,
        "drop": figures["drop"],
        "num_samples": 512,
        "size_bytes": figures["size_bytes"] + 2150,
        "sha256": hashlib.sha256(repr(figures).encode()).hexdigest(),
        "latency_ms": {
            "mean": mean,
            "p50": round(mean * 0.97, 4),
            "p90": round(mean * 1.12, 4),
            "batch_size": 1,
            "repeats": 50,
            "device": CPU,
            "provider": "CPUExecutionProvider",
        },
    }


def plan_point(candidates: list[str], measured: bool = True) -> dict[str, Any]:
    """planner.plan.PlanPoint.to_dict()."""
    figures = point_figures(candidates)
    return {
        "layers": configuration(candidates),
        "predicted": {key: figures[key] for key in ("omega", "loss_change", "size_bytes", "bops")},
        "measured": measurement(figures) if measured else None,
    }


@dataclass
class DashboardData:
    model_id: str
    dataset_id: str
    hawq_v2_id: str
    hawq_v1_id: str
    interlayer_id: str
    plan_id: str
    sensitivity_job_id: str
    plan_job_id: str
    failed_job_id: str
    running_job_id: str
    points: list[dict[str, Any]]  # index, assignment, figures
    artifacts: dict[int, str] = field(default_factory=dict)  # point index -> sha256 of its artifact
    max_size_bytes: int = 0
    bisection_plan_id: str = ""
    latency_plan_id: str = ""


def write_blob(app, data: bytes) -> str:
    writer = app.state.store.writer(max_bytes=len(data))
    writer.write(data)
    sha256 = writer.commit()
    assert sha256 == hashlib.sha256(data).hexdigest()
    return sha256


def artifact_bytes(index: int) -> bytes:
    return (f"mpq quantized model, frontier point {index}\n".encode() * 64) + bytes(range(256)) * (index + 1)


def insert(app) -> DashboardData:
    """Insert every row and blob; returns their ids and the figures the pages should show."""
    now = utcnow()
    model, dataset = _inputs(app, now)
    done, planned, failed, running = _jobs(model, now)
    results = {
        method: SensitivityResultRow(
            job_id=done.id,
            model_sha256=model.sha256,
            dataset_sha256=dataset.sha256,
            method=method,
            params_hash=hashlib.sha256(method.encode()).hexdigest(),
            result=result,
            versions=dict(VERSIONS),
            created_at=now - timedelta(hours=2),
        )
        for method, result in (
            ("hawq_v2", hawq_v2_result()),
            ("hawq_v1", hawq_v1_result()),
            ("interlayer", interlayer_result()),
        )
    }
    with app.state.sessions() as session, session.begin():
        session.add_all([model, dataset, done, planned, failed, running, *results.values()])
        session.flush()
        done.result = {"sensitivity_result_id": results["hawq_v2"].id, "cached": False}
    data = DashboardData(
        model_id=model.id,
        dataset_id=dataset.id,
        hawq_v2_id=results["hawq_v2"].id,
        hawq_v1_id=results["hawq_v1"].id,
        interlayer_id=results["interlayer"].id,
        plan_id="",
        sensitivity_job_id=done.id,
        plan_job_id=planned.id,
        failed_job_id=failed.id,
        running_job_id=running.id,
        points=[],
    )
    _insert_plan(app, data, model, dataset, planned, now)
    data.bisection_plan_id = _insert_bisection_plan(app, model, dataset, now)
    data.latency_plan_id = _insert_latency_plan(app, model, dataset, now)
    return data


def _inputs(app, now) -> tuple[Model, Dataset]:
    """The model and calibration rows, with blobs in the store so their downloads work."""
    model_bytes = b"resnet-mini onnx bytes (the dashboard never opens them)\n" * 32
    dataset_bytes = b"calibration npz bytes\n" * 32
    model = Model(
        id=new_id(),
        name="resnet-mini",
        format="onnx",
        sha256=write_blob(app, model_bytes),
        size_bytes=len(model_bytes),
        opset=17,
        created_at=now - timedelta(hours=3),
        layers=layer_rows(),
        details={
            "ir_version": 8,
            "producer": "pytorch 2.13.0",
            "node_count": 23,
            "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 32, 32]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
        },
    )
    dataset = Dataset(
        id=new_id(),
        name="calib-512",
        sha256=write_blob(app, dataset_bytes),
        size_bytes=len(dataset_bytes),
        num_samples=512,
        has_labels=True,
        created_at=now - timedelta(hours=3),
        arrays={"input": {"shape": [512, 3, 32, 32], "dtype": "float32"}, "labels": {"shape": [512], "dtype": "int64"}},
    )
    return model, dataset


def _jobs(model: Model, now) -> tuple[Job, Job, Job, Job]:
    """A succeeded sensitivity job, the succeeded plan job, a failed one and a running one."""
    done = Job(
        id=new_id(),
        type="sensitivity",
        status="succeeded",
        attempts=1,
        worker_id="node-1:4242",
        params={"model_id": model.id, "method": "hawq_v2"},
        progress_phase="done",
        progress_fraction=1.0,
        created_at=now - timedelta(hours=2),
        started_at=now - timedelta(hours=2),
        finished_at=now - timedelta(hours=2) + timedelta(seconds=14),
        log_tail="[sensitivity:traces] 100% 64 probes, max relative SE 7.1 %",
    )
    planned = Job(
        id=new_id(),
        type="plan",
        status="succeeded",
        params={"search": "pareto"},
        progress_phase="done",
        progress_fraction=1.0,
        attempts=1,
        created_at=now - timedelta(hours=1),
        finished_at=now - timedelta(minutes=50),
    )
    failed = Job(
        id=new_id(),
        type="sensitivity",
        status="failed",
        attempts=1,
        progress_phase="loading",
        progress_fraction=0.0,
        created_at=now - timedelta(minutes=30),
        finished_at=now - timedelta(minutes=30),
        error="the calibration dataset's arrays do not match the model's inputs ['input']: "
        "missing ['input'], unexpected ['x']",
    )
    running = Job(
        id=new_id(),
        type="plan",
        status="running",
        params={"search": "pareto", "method": "interlayer"},
        progress_phase="sensitivity:traces",
        progress_fraction=0.42,
        progress_message="probe 54 of 128, max relative SE 7.9 %",
        attempts=1,
        worker_id=worker_id(),
        created_at=now - timedelta(minutes=2),
        started_at=now - timedelta(minutes=2),
        heartbeat_at=now,
    )
    return done, planned, failed, running


def _insert_plan(app, data: DashboardData, model: Model, dataset: Dataset, plan_job: Job, now) -> None:
    """The rows the plan job writes (service.jobs.job_types.store_plan), in the planner's shapes."""
    points = [plan_point(candidates, measured=index != UNMEASURED_POINT) for index, candidates in enumerate(FRONTIER)]
    artifacts: dict[int, Artifact] = {}
    for index in range(len(points)):
        if index == UNMEASURED_POINT:
            continue
        payload = artifact_bytes(index)
        data.artifacts[index] = write_blob(app, payload)
        artifacts[index] = Artifact(
            id=new_id(),
            sha256=data.artifacts[index],
            size_bytes=len(payload),
            kind="quantized_model",
            filename=f"resnet-mini-point{index}.onnx",
        )
    data.points = [
        {"index": index, "assignment": point["layers"], **point_figures(FRONTIER[index])}
        for index, point in enumerate(points)
    ]
    chosen = points[CHOSEN_POINT]
    data.max_size_bytes = (chosen["predicted"]["size_bytes"] + points[2]["predicted"]["size_bytes"]) // 2
    plan = Plan(
        id=new_id(),
        job_id=plan_job.id,
        model_id=model.id,
        calibration_dataset_id=dataset.id,
        evaluation_dataset_id=dataset.id,
        search="pareto",
        created_at=now - timedelta(minutes=50),
        request={
            "model_id": model.id,
            "calibration_dataset_id": dataset.id,
            "evaluation_dataset_id": dataset.id,
            "method": "hawq_v2",
            "search": "pareto",
            "candidates": list(CANDIDATE_BITS),
            "options": {"seed": 0},
            "constraints": {
                "max_size_bytes": data.max_size_bytes,
                "max_bops": None,
                "max_latency_ms": None,
                "max_drop": MAX_DROP,
            },
        },
        assignment=chosen["layers"],
        predicted={**chosen["predicted"], "meets_constraints": True},
        measured=chosen["measured"],
        result={
            "run": {"evaluations": 6, "search": {"kind": "diagonal_frontier"}},
            "uniform": {c: plan_point([c] * len(LAYERS)) for c in CANDIDATE_BITS},
        },
        artifact_id=artifacts[CHOSEN_POINT].id,
        versions=dict(VERSIONS),
    )
    rows: list[Any] = [
        FrontierPointRow(
            plan_id=plan.id,
            index=index,
            assignment=point["layers"],
            size_bytes=point["predicted"]["size_bytes"],
            bops=point["predicted"]["bops"],
            predicted_loss_change=point["predicted"]["omega"],
            predicted=point["predicted"],
            measured=point["measured"] or {},
            artifact_id=artifacts[index].id if index in artifacts else None,
        )
        for index, point in enumerate(points)
    ]
    for minutes, device, provider, batch, mean in LATENCY_RUNS:
        rows.append(
            LatencyMeasurementRow(
                plan_id=plan.id,
                artifact_id=plan.artifact_id,
                mean_ms=mean,
                p50_ms=latency_percentiles(mean)[0],
                p90_ms=latency_percentiles(mean)[1],
                batch_size=batch,
                repeats=50,
                device_description=device,
                provider=provider,
                onnxruntime_version="1.23.0",
                created_at=now - timedelta(minutes=minutes),
            )
        )
    with app.state.sessions() as session, session.begin():
        session.add_all([*artifacts.values(), plan])
        session.flush()  # the rows carry no relationships, so parents go first by hand
        session.add_all(rows)
        session.get(Job, plan_job.id).result = {"plan_id": plan.id}
    data.plan_id = plan.id


def bisection_step(k: int) -> list[str]:
    """The candidates of the configuration that demotes the first k layers of DEMOTION_ORDER."""
    return ["w4a8" if name in DEMOTION_ORDER[:k] else "fp32" for name, *_ in LAYERS]


def _insert_bisection_plan(app, model: Model, dataset: Dataset, now) -> str:
    """A bisection plan as the plan job stores one: no job, artifact or latency rows of its own."""
    steps = [plan_point(bisection_step(k)) for k in BISECTION_STEPS]
    chosen = steps[BISECTION_CHOSEN]
    plan = Plan(
        id=new_id(),
        model_id=model.id,
        calibration_dataset_id=dataset.id,
        evaluation_dataset_id=dataset.id,
        search="bisection",
        created_at=now - timedelta(minutes=40),
        request={
            "model_id": model.id,
            "method": "hawq_v2",
            "search": "bisection",
            "candidates": ["fp32", "w4a8"],
            "constraints": {
                "max_size_bytes": None,
                "max_bops": None,
                "max_latency_ms": None,
                "max_drop": BISECTION_MAX_DROP,
            },
        },
        assignment=chosen["layers"],
        predicted={**chosen["predicted"], "meets_constraints": True},
        measured=chosen["measured"],
        result={
            "run": {
                "evaluations": len(steps),
                "search": {
                    "solver": "bisection",
                    "low": "w4a8",
                    "high": "fp32",
                    "ordering": "diagonal",
                    "order": DEMOTION_ORDER,
                    "demoted": BISECTION_STEPS[BISECTION_CHOSEN],
                    "within_tolerance": True,
                    "steps": [
                        {
                            "k": k,
                            "drop": point_figures(bisection_step(k))["drop"],
                            "cost": point_figures(bisection_step(k))["size_bytes"],
                        }
                        for k in (5, 2, 3)
                    ],
                },
            },
            "uniform": {c: plan_point([c] * len(LAYERS)) for c in ("fp32", "w4a8")},
        },
        versions=dict(VERSIONS),
    )
    with app.state.sessions() as session, session.begin():
        session.add(plan)
        session.flush()
        session.add_all(
            FrontierPointRow(
                plan_id=plan.id,
                index=index,
                assignment=step["layers"],
                size_bytes=step["predicted"]["size_bytes"],
                bops=step["predicted"]["bops"],
                predicted_loss_change=step["predicted"]["omega"],
                predicted=step["predicted"],
                measured=step["measured"],
            )
            for index, step in enumerate(steps)
        )
    return plan.id


# The latency plan (objective=latency, planner.latency_table): w8a8 speeds every layer up, w8 (weight
# only: its DequantizeLinear runs on every call) slows every layer down, as issue 13 measured (w8
# 1.3-1.5x float). Contributions are fractions of the float model's p50 (LayerLatency.ratio).
LATENCY_FLOAT_P50_MS = 0.5
LATENCY_CANDIDATES = {"fp32": (32, 32), "w8a8": (8, 8), "w8": (8, 32)}
LATENCY_CONTRIBUTIONS = {"w8a8": [-0.02, -0.05, -0.04, -0.03, 0.01], "w8": [0.08, 0.10, 0.07, 0.06, 0.03]}
LATENCY_SPREAD = 0.02  # of every measured ratio to float
# Adjacent-pair terms at w8a8 (LatencyTable.pairs): layers i and i + 1 quantized together cost less than alone.
LATENCY_PAIR_TERMS = {(0, 1): -0.01, (1, 2): -0.006}
# Points: candidates, measured ratio to float (the prediction off by a little, as measurements are), drop.
LATENCY_FRONTIER = [
    (["fp32"] * 5, 1.01, 0.0),
    (["w8a8"] * 5, 0.88, 0.31),
    (["w8", "w8a8", "w8a8", "w8a8", "w8"], 0.98, 0.19),
    (["w8"] * 5, 1.36, 0.04),
    (["w8", "w8", "w8", "w8a8", "w8a8"], 1.22, 0.11),
]
LATENCY_CHOSEN = 1
LATENCY_SLOWER = [3, 4]  # ratio − spread above 1: measured slower than float
LATENCY_FP16 = (0.93, 0.01)  # the fp16 baseline's ratio to float and drop


def latency_table() -> dict[str, Any]:
    """planner.latency_table.LatencyTable.to_dict() of the latency plan's table."""
    return {
        "format": "mpq.latency_table/1",
        "model_sha256": "ab" * 32,
        "device_description": CPU,
        "provider": "CPUExecutionProvider",
        "onnxruntime_version": "1.23.0",
        "batch_size": 1,
        "candidates": list(LATENCY_CANDIDATES),
        "threads": None,
        "float_p50_ms": LATENCY_FLOAT_P50_MS,
        "design": "single-layer-variants+adjacent-pairs",
        "layers": {
            name: {
                candidate: {"ms": ratios[i] * LATENCY_FLOAT_P50_MS, "ratio": ratios[i], "spread": 0.01}
                for candidate, ratios in LATENCY_CONTRIBUTIONS.items()
            }
            for i, (name, *_) in enumerate(LAYERS)
        },
        "pairs": [
            {
                "layers": [LAYERS[i][0], LAYERS[j][0]],
                "candidates": {"w8a8": {"ms": term * LATENCY_FLOAT_P50_MS, "ratio": term, "spread": 0.005}},
            }
            for (i, j), term in LATENCY_PAIR_TERMS.items()
        ],
    }


def predicted_latency_ms(candidates: list[str]) -> float:
    """float p50 · (1 + Σ contributions + the pair terms of adjacent layers both at w8a8):
    planner.latency_table.predict_latency."""
    ratio = 1.0 + sum(0.0 if c == "fp32" else LATENCY_CONTRIBUTIONS[c][i] for i, c in enumerate(candidates))
    ratio += sum(term for (i, j), term in LATENCY_PAIR_TERMS.items() if candidates[i] == candidates[j] == "w8a8")
    return LATENCY_FLOAT_P50_MS * ratio


def latency_measurement(ratio: float, drop: float, spread: float = LATENCY_SPREAD) -> dict[str, Any]:
    """Measurement.to_dict() of a configuration timed interleaved with the float model."""
    p50 = round(LATENCY_FLOAT_P50_MS * ratio, 4)
    figures = {"latency_ms": round(p50 / 0.97, 4), "metric": round(FLOAT_METRIC - drop, 3), "drop": drop}
    measured = measurement({**figures, "size_bytes": 0})
    measured["latency_ms"]["p50"] = p50
    return {
        **measured,
        "latency_ratio_to_float": ratio,
        "latency_ratio_spread": spread,
        "float_latency_p50_ms": LATENCY_FLOAT_P50_MS,
    }


def latency_point(candidates: list[str], ratio: float, drop: float) -> dict[str, Any]:
    """PlanPoint.to_dict() of a latency plan's point: its predicted latency from the table, measured too."""
    size = sum(num_params(shape) * LATENCY_CANDIDATES[c][0] // 8 for (_, _, shape, _), c in zip(LAYERS, candidates))
    bops = sum(
        num_params(shape) * positions * LATENCY_CANDIDATES[c][0] * LATENCY_CANDIDATES[c][1]
        for (_, _, shape, positions), c in zip(LAYERS, candidates)
    )
    omega = drop / 2.0
    measured = latency_measurement(ratio, drop)
    measured["size_bytes"] = size + 2150
    return {
        "layers": configuration(candidates),
        "predicted": {
            "omega": omega,
            "loss_change": omega * 1.07,
            "size_bytes": size,
            "bops": bops,
            "latency_ms": predicted_latency_ms(candidates),
        },
        "measured": measured,
    }


def _insert_latency_plan(app, model: Model, dataset: Dataset, now) -> str:
    """A pareto plan on latency (objective=latency) with its latency table, every point timed
    interleaved with the float model (two of them slower than it) and the fp32 and fp16 baselines."""
    points = [latency_point(*entry) for entry in LATENCY_FRONTIER]
    chosen = points[LATENCY_CHOSEN]
    baselines = {"fp32": latency_measurement(1.0, 0.0, spread=0.0), "fp16": latency_measurement(*LATENCY_FP16)}
    table = latency_table()
    plan = Plan(
        id=new_id(),
        model_id=model.id,
        calibration_dataset_id=dataset.id,
        evaluation_dataset_id=dataset.id,
        search="pareto",
        created_at=now - timedelta(minutes=30),
        request={
            "model_id": model.id,
            "method": "hawq_v2",
            "search": "pareto",
            "objective": "latency",
            "candidates": list(LATENCY_CANDIDATES),
            "constraints": {"max_size_bytes": None, "max_bops": None, "max_latency_ms": None, "max_drop": MAX_DROP},
        },
        assignment=chosen["layers"],
        predicted={**chosen["predicted"], "meets_constraints": True},
        measured=chosen["measured"],
        result={
            "run": {
                "evaluations": len(points),
                "search": {"kind": "diagonal_frontier", "latency_table": table, "latency_table_reused": False},
            },
            "uniform": {
                c: latency_point([c] * len(LAYERS), *LATENCY_FRONTIER[k][1:])
                for k, c in ((0, "fp32"), (1, "w8a8"), (3, "w8"))
            },
            "baselines": baselines,
        },
        versions=dict(VERSIONS),
    )
    with app.state.sessions() as session, session.begin():
        session.add(plan)
        session.flush()
        session.add_all(
            FrontierPointRow(
                plan_id=plan.id,
                index=index,
                assignment=point["layers"],
                size_bytes=point["predicted"]["size_bytes"],
                bops=point["predicted"]["bops"],
                predicted_loss_change=point["predicted"]["omega"],
                predicted=point["predicted"],
                measured=point["measured"],
            )
            for index, point in enumerate(points)
        )
        session.add(
            LatencyTableRow(
                model_sha256=model.sha256,
                device_description=table["device_description"],
                provider=table["provider"],
                onnxruntime_version=table["onnxruntime_version"],
                batch_size=table["batch_size"],
                candidates=",".join(table["candidates"]),
                table=table,
            )
        )
    return plan.id


def plan_figures(search: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(points, uniform baselines) of the pareto or the bisection plan with the figures its page shows:
    size_bytes, bops, predicted_loss_change (Ω: both plans are hawq_v2), and latency_ms and metric,
    None where the point was not measured."""

    def shown(candidates: list[str], measured: bool = True) -> dict[str, Any]:
        figures = point_figures(candidates)
        return {
            "size_bytes": figures["size_bytes"],
            "bops": figures["bops"],
            "predicted_loss_change": figures["omega"],
            "latency_ms": figures["latency_ms"] if measured else None,
            "metric": figures["metric"] if measured else None,
        }

    if search == "bisection":
        points = [shown(bisection_step(k)) for k in BISECTION_STEPS]
        candidates = ["fp32", "w4a8"]
    else:
        points = [shown(c, measured=index != UNMEASURED_POINT) for index, c in enumerate(FRONTIER)]
        candidates = list(CANDIDATE_BITS)
    return points, [{"candidate": c, **shown([c] * len(LAYERS))} for c in candidates]


class StandInWorker:
    """Plays the supervisor of the running job without spawning anything: beats its heartbeat (so the
    reaper leaves it alone) and honours a cancel request the way ``service.jobs.supervisor`` does."""

    LOG_TAIL = "[loading] 0% loading resnet-mini\n[sensitivity:traces] 42% probe 54 of 128, max relative SE 7.9 %"

    def __init__(self, app, job_id: str) -> None:
        self.sessions, self.db, self.job_id = app.state.sessions, app.state.db, job_id
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"stand-in-{job_id}")

    def __enter__(self) -> StandInWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stopped.wait(0.2):
            with self.sessions() as session, session.begin():
                job = session.get(Job, self.job_id)
                job.heartbeat_at, job.log_tail = utcnow(), self.LOG_TAIL
                cancelled = job.cancel_requested
            if cancelled:
                self.db.finish_job(
                    self.job_id,
                    JobStatus.CANCELLED,
                    error="cancelled by request",
                    log_tail=self.LOG_TAIL,
                    only_worker=worker_id(),
                )
                return
