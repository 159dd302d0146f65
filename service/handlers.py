"""Job handlers: what a worker process does for each job type. Imported only in workers
(they pull in torch and the libraries)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select

from service.jobs import JobContext, JobInputError, job_handler
from service.model_files import load_arrays, load_program, model_path, plan_request, sensitivity_config
from service.tables import Dataset, Model, SensitivityResult


def params_hash(config_dict: dict[str, Any]) -> str:
    """Cache key part: the configuration minus what cannot change the numbers (the device)."""
    relevant = {k: v for k, v in config_dict.items() if k != "device"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _rows(context: JobContext, model_id: str, *dataset_ids: str) -> tuple[Model | Dataset, ...]:
    """The job's model and datasets, read once; a row deleted since submission is the user's doing."""
    with context.sessions() as session:
        model = session.get(Model, model_id)
        datasets = [session.get(Dataset, dataset_id) for dataset_id in dataset_ids]
    if model is None or any(dataset is None for dataset in datasets):
        raise JobInputError(f"the {'model' if model is None else 'dataset'} was deleted before the job ran")
    return (model, *datasets)


def cached_sensitivity(context: JobContext, model: Model, dataset: Dataset, method: str,
                       key: str) -> SensitivityResult | None:
    with context.sessions() as session:
        return session.scalars(select(SensitivityResult).where(
            SensitivityResult.model_sha256 == model.sha256, SensitivityResult.dataset_sha256 == dataset.sha256,
            SensitivityResult.method == method, SensitivityResult.params_hash == key)
            .order_by(SensitivityResult.created_at.desc())).first()


def compute_or_reuse_sensitivity(context: JobContext, model: Model, dataset: Dataset, method: str,
                                 options: dict[str, Any], progress_scale: float = 1.0) -> tuple[str, bool]:
    """The id of a stored sensitivity result for these inputs, computing it if not cached."""
    from sensitivity.run import compute_sensitivity

    try:
        config = sensitivity_config(method, options)
    except ValueError as error:
        raise JobInputError(str(error)) from None
    key = params_hash(config.to_dict())
    cached = cached_sensitivity(context, model, dataset, method, key)
    if cached is not None:
        context.log(f"reusing sensitivity result {cached.id} (same model, data, method and parameters)")
        return cached.id, True

    def progress(phase: str, fraction: float, message: str) -> None:
        context.progress(f"sensitivity:{phase}", fraction * progress_scale, message)

    context.progress("loading", 0.0, f"loading {model.name}")
    with model_path(context.store, model.sha256, model.format) as path:
        try:
            program = load_program(path, model.format)
            calibration = load_arrays(context.store, dataset.sha256)
            result = compute_sensitivity(program, calibration, config, progress)
        except ValueError as error:  # bad inputs: unsupported ops, arrays not matching the model
            raise JobInputError(str(error)) from None
    data = result.to_dict()
    row = SensitivityResult(job_id=context.job_id, model_sha256=model.sha256, dataset_sha256=dataset.sha256,
                            method=method, params_hash=key, result=data, versions=data.get("versions", {}))
    context.save(row)
    return row.id, False


@job_handler("sensitivity")
def sensitivity_job(context: JobContext) -> dict[str, Any]:
    params = context.params
    model, dataset = _rows(context, params["model_id"], params["dataset_id"])
    result_id, cached = compute_or_reuse_sensitivity(context, model, dataset, params["method"],
                                                     params.get("options", {}))
    return {"sensitivity_result_id": result_id, "cached": cached}


def store_blob(context: JobContext, data: bytes) -> tuple[str, int]:
    """Write bytes into the content-addressed store; returns (sha256, size)."""
    writer = context.store.writer(max_bytes=max(len(data), 1))
    try:
        writer.write(data)
        return writer.commit(), len(data)
    except BaseException:
        writer.abort()
        raise


def latency_row(measured, plan_id: str, artifact_id: str):
    """The stored row of a ``planner.latency.LatencyMeasurement``."""
    from dataclasses import asdict

    from service.tables import LatencyMeasurement

    return LatencyMeasurement(plan_id=plan_id, artifact_id=artifact_id, **asdict(measured))


@job_handler("latency")
def latency_job(context: JobContext) -> dict[str, Any]:
    from planner.latency import measure_latency
    from service.tables import Artifact, Plan

    params = context.params
    with context.sessions() as session:
        plan = session.get(Plan, params["plan_id"])
        artifact = session.get(Artifact, plan.artifact_id) if plan and plan.artifact_id else None
        calibration = session.get(Dataset, plan.calibration_dataset_id) if plan else None
    if artifact is None or calibration is None:
        raise JobInputError("the plan, its artifact or its calibration dataset was deleted")
    context.progress("latency", 0.0, f"timing {params['repeats']} runs at batch size {params['batch_size']}")
    model_bytes = context.store.local_path(artifact.sha256).read_bytes()
    inputs = {k: v for k, v in load_arrays(context.store, calibration.sha256).items() if k != "labels"}
    measured = measure_latency(model_bytes, inputs, device=params.get("device", "auto"),
                               warmup=params.get("warmup", 10), repeats=params["repeats"],
                               batch_size=params["batch_size"])
    row = latency_row(measured, plan.id, artifact.id)
    context.save(row)
    return {"latency_measurement_id": row.id}


@job_handler("plan")
def plan_job(context: JobContext) -> dict[str, Any]:
    import onnx

    from planner.plan import NoFeasiblePlan, plan
    from sensitivity.results import SensitivityResult as Sensitivity

    params = context.params
    evaluation_id = params.get("evaluation_dataset_id")
    model, calibration_row, *evaluation = _rows(context, params["model_id"], params["calibration_dataset_id"],
                                                *([evaluation_id] if evaluation_id else []))
    evaluation_row = evaluation[0] if evaluation else None
    try:
        request = plan_request(params)
        config = request.sensitivity_config().to_dict()
    except ValueError as error:
        raise JobInputError(str(error)) from None
    options = {k: v for k, v in config.items() if k != "type"}
    result_id, _ = compute_or_reuse_sensitivity(context, model, calibration_row, "interlayer", options)
    with context.sessions() as session:
        sensitivity = Sensitivity.from_dict(session.get(SensitivityResult, result_id).result)

    def progress(phase: str, fraction: float, message: str) -> None:
        context.progress(f"plan:{phase}", fraction, message)

    with model_path(context.store, model.sha256, model.format) as path:
        proto = onnx.load(str(path))
    calibration = load_arrays(context.store, calibration_row.sha256)
    evaluation = load_arrays(context.store, evaluation_row.sha256) if evaluation_row else None
    try:
        result = plan(proto, calibration, request, evaluation=evaluation, sensitivity=sensitivity,
                      progress=progress)
    except NoFeasiblePlan as error:
        raise JobInputError(str(error), code="infeasible") from None
    except ValueError as error:
        raise JobInputError(str(error)) from None
    plan_id = _store_plan(context, model, params, result, result_id)
    return {"plan_id": plan_id, "sensitivity_result_id": result_id, "meets_constraints": result.meets_constraints}


def _store_plan(context: JobContext, model: Model, params: dict[str, Any], result, sensitivity_id: str) -> str:
    """The artifact blob, then its row, the plan, its frontier points and its latency, in one transaction."""
    from service.tables import Artifact, FrontierPoint, Plan, new_id

    data = result.to_dict()
    sha256, size = store_blob(context, result.artifact_bytes)
    artifact = Artifact(id=new_id(), sha256=sha256, size_bytes=size, kind="quantized_model",
                        filename=f"{model.name.removesuffix('.onnx')}-mixed.onnx")
    chosen = data["plan"]
    plan_row = Plan(id=new_id(), job_id=context.job_id, model_id=model.id,
                    calibration_dataset_id=params["calibration_dataset_id"],
                    evaluation_dataset_id=params.get("evaluation_dataset_id"), search=params["search"],
                    request={**params, "sensitivity_result_id": sensitivity_id}, assignment=chosen["layers"],
                    predicted={**chosen["predicted"], "meets_constraints": data["meets_constraints"]},
                    measured={**(chosen["measured"] or {}), "uniform": data["uniform"],
                              "evaluations": data["evaluations"], "search": data["search"],
                              "timings": data["timings"], "activation_terms": data["activation_terms"]},
                    artifact_id=artifact.id, versions=data["versions"])
    rows: list[Any] = [artifact, plan_row]
    rows += [FrontierPoint(plan_id=plan_row.id, index=index, assignment=point["layers"],
                           size_bytes=point["predicted"]["size_bytes"], bops=point["predicted"]["bops"],
                           predicted_loss_change=_predicted_by_method(point["predicted"], params["method"]),
                           predicted=point["predicted"], measured=point["measured"] or {})
             for index, point in enumerate(data["frontier"])]
    latency = result.plan.measured.latency if result.plan.measured else None
    if latency is not None:
        rows.append(latency_row(latency, plan_row.id, artifact.id))
    context.save(*rows)
    return plan_row.id


def _predicted_by_method(predicted: dict[str, Any], method: str) -> float | None:
    """The predictor the plan's method optimised: Ω for HAWQ-V2, ΔL for the inter-layer objective."""
    return predicted.get("omega") if method == "hawq_v2" else predicted.get("loss_change")
