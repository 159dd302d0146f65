"""What each job type computes, inside its sandboxed process (``service.jobs.job_process``).

Imported only there; each imports torch and the libraries when it runs. A handler reads its inputs from the
context, reports progress, and returns a JSON-able payload that the supervisor stores
(``service.jobs.job_types``); it never sees the database or the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from service.inspection.model_files import PT2_PROGRAM, load_model, load_program, plan_request, sensitivity_config
from service.jobs.context import ChildContext, Handler
from service.jobs.errors import JobInputError


def params_hash(config_dict: dict[str, Any]) -> str:
    """Cache key part: the configuration minus what cannot change the numbers (the device)."""
    relevant = {k: v for k, v in config_dict.items() if k != "device"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def compute_or_reuse_sensitivity(
    context: ChildContext, method: str, options: dict[str, Any], model: Any = None, sample_axes: Any = None
) -> tuple[dict[str, Any], bool]:
    """The stored result of this analysis on the job's model and calibration data, computing (and
    handing it to the supervisor to store) if there is none. Returns (result dict, reused).
    ``model``: the job's model already normalised (``sensitivity.normalize.NormalizedModel``), if it is.
    ``sample_axes``: the request's (``sensitivity.samples``), part of the reuse key when given."""
    import planner.measured  # noqa: F401  # registers the measured analysis with compute_sensitivity
    from sensitivity.onnx_program import load_onnx
    from sensitivity.run import compute_sensitivity
    from sensitivity.samples import check_sample_axes

    try:
        config = sensitivity_config(method, options)
        axes = check_sample_axes(sample_axes or {})
    except ValueError as error:
        raise JobInputError(str(error)) from None
    # the sample axes change which values form a sample; without any, the key is what it always was
    # (the local cache's rule: service/cli/local_commands._cached_sensitivity)
    pt2 = PT2_PROGRAM if context.model["format"] == "torch_export" else {}
    key = params_hash({**config.to_dict(), **({"sample_axes": axes} if axes else {}), **pt2})
    cached = context.cached_sensitivity(method, key)
    if cached is not None:
        context.log("reusing a stored sensitivity result (same model, data, method and parameters)")
        return cached, True

    def progress(phase: str, fraction: float, message: str) -> None:
        context.progress(f"sensitivity:{phase}", fraction, message)

    context.progress("loading", 0.0, f"loading {context.model['name']}")
    calibration = context.arrays("calibration")
    with context.model_path() as path:
        try:
            program = (
                load_program(path, context.model["format"], calibration, axes, context.log)
                if model is None
                else load_onnx(model, sample_axes=axes)
            )
            result = compute_sensitivity(program, calibration, config, progress)
        except ValueError as error:  # bad inputs: unsupported ops, arrays not matching the model, a refused .pt2
            raise JobInputError(str(error)) from None
    data = result.to_dict()
    context.save_sensitivity(method, key, data)
    return data, False


def sensitivity_job(context: ChildContext) -> dict[str, Any]:
    # jobs submitted before the sample_axes field have none: the declared shapes say
    _result, reused = compute_or_reuse_sensitivity(
        context,
        context.params["method"],
        context.params.get("options", {}),
        sample_axes=context.params.get("sample_axes"),
    )
    return {"cached": reused}


def latency_job(context: ChildContext) -> dict[str, Any]:
    from planner.latency import measure_latency

    params = context.params
    context.progress("latency", 0.0, f"timing {params['repeats']} runs at batch size {params['batch_size']}")
    with context.model_path() as path:
        model_bytes = path.read_bytes()
    inputs = {k: v for k, v in context.arrays("calibration").items() if k != "labels"}
    # the plan's own sample axes (its stored request: service.jobs.job_types.prepare_latency)
    measured = measure_latency(
        model_bytes,
        inputs,
        device=params.get("device", "auto"),
        warmup=params.get("warmup", 10),
        repeats=params["repeats"],
        batch_size=params["batch_size"],
        sample_axes=context.model.get("sample_axes"),
    )
    return {"latency": asdict(measured)}


def plan_job(context: ChildContext) -> dict[str, Any]:
    from planner import NoFeasiblePlan, normalize_for_plan, plan
    from sensitivity.results import SensitivityResult

    calibration = context.arrays("calibration")
    try:
        request = plan_request(context.params)
        # ONNX as uploaded; a .pt2 exported to ONNX and checked against its program (then planned alike)
        with context.model_path() as path:
            proto = load_model(path, context.model["format"], calibration, request.sample_axes, context.log)
        config = request.sensitivity_config().to_dict()
        # normalised (opset upgrade checked on the first calibration samples) before the analysis,
        # which then runs on the very model the planner exports
        normalized = normalize_for_plan(proto, calibration, request)
    except ValueError as error:
        raise JobInputError(str(error)) from None
    options = {k: v for k, v in config.items() if k != "type"}
    sensitivity_data, _ = compute_or_reuse_sensitivity(
        context, request.method, options, normalized, request.sample_axes
    )  # a stored one if any

    def progress(phase: str, fraction: float, message: str) -> None:
        context.progress(f"plan:{phase}", fraction, message)

    try:
        result = plan(
            normalized,
            calibration,
            request,
            evaluation=context.arrays_if_given("evaluation"),
            sensitivity=SensitivityResult.from_dict(sensitivity_data),
            progress=progress,
            latency_table=_stored_latency_table(context, normalized, request),
        )
    except NoFeasiblePlan as error:
        raise JobInputError(str(error), code="infeasible") from None
    except ValueError as error:
        raise JobInputError(str(error)) from None
    if "latency_table" in result.run.search and not result.run.search.get("latency_table_reused"):
        context.save_latency_table(dict(result.run.search["latency_table"]))
    context.write_artifact(result.artifact_bytes)
    latency = result.plan.measured.latency if result.plan.measured else None
    return {"plan": result.to_dict(), "latency": asdict(latency) if latency is not None else None}


def _stored_latency_table(context: ChildContext, normalized: Any, request: Any) -> Any:
    """The stored latency table for this model where this job runs (``planner.LatencyTable``), when
    the search needs one and the supervisor has one with the same key; else None (plan measures it)."""
    from planner.latency_table import LatencyTable, table_key, timing_for

    if not request.needs_latency_table:
        return None
    stored = context.cached_latency_table(table_key(normalized, request.candidates, timing_for(request)))
    if stored is None:
        return None
    try:
        return LatencyTable.from_dict(stored)
    except ValueError as error:  # written by another version: measure again
        context.log(f"a stored latency table could not be read ({error}); measuring a new one")
        return None


HANDLERS: dict[str, Handler] = {"sensitivity": sensitivity_job, "latency": latency_job, "plan": plan_job}
