"""From stored uploads and API bodies to what the libraries take: programs, configurations, plan requests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the libraries load torch: imported where used, and here for the types only
    import onnx

    from planner import PlanRequest
    from sensitivity.program import Program
    from sensitivity.results import Config

# the local CLI's words (service/cli/local_commands.load_program), for the API's field
PT2_SAMPLE_AXES = "sample_axes applies to ONNX models; a torch.export archive takes samples on axis 0"
# Part of a .pt2's sensitivity cache key: its results are computed on its ONNX export (``load_model``),
# so a result stored from the torch program itself (before the export, BatchNorm unfolded) is not reused.
PT2_PROGRAM = {"torch_export": "onnx_export"}
SENSITIVITY_METHODS = {
    "hawq_v2": "TraceConfig",
    "hawq_v1": "EigenConfig",
    "interlayer": "InterLayerConfig",
    "fisher": "FisherConfig",
    "measured": "MeasuredConfig",
}


def load_program(
    path: Path,
    model_format: str,
    samples: Mapping[str, Any] | None = None,
    sample_axes: Mapping[str, int | None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Program:
    """The program of a stored model; ONNX is normalised first, an opset upgrade checked on ``samples``
    (the calibration arrays) before the analysis starts. ``sample_axes`` (a request's) are merged over
    the ONNX model's declared ones (``sensitivity.samples``); a torch.export archive is exported to ONNX
    first (``load_model``), takes samples on axis 0 and no ``sample_axes`` (ValueError)."""
    from sensitivity.normalize import normalize_model
    from sensitivity.onnx_program import load_onnx

    normalized = normalize_model(
        load_model(path, model_format, samples, sample_axes, log), samples=samples, sample_axes=sample_axes
    )
    return load_onnx(normalized, sample_axes=sample_axes)


def load_model(
    path: Path,
    model_format: str,
    samples: Mapping[str, Any] | None = None,
    sample_axes: Mapping[str, int | None] | None = None,
    log: Callable[[str], None] | None = None,
) -> onnx.ModelProto:
    """The ONNX model of a stored upload: an ONNX file as it is; a torch.export archive loaded without
    unpickling and exported to ONNX by torch's exporter, checked against the program on ``samples``
    (``sensitivity.torch_onnx``: what every job of a ``.pt2`` analyses and plans). ValueError if bad."""
    if model_format == "torch_export":
        if sample_axes:
            raise ValueError(PT2_SAMPLE_AXES)
        from planner.export import check_inputs
        from sensitivity.torch_onnx import load_exported_onnx

        export = load_exported_onnx(path)
        if samples is not None:  # the arrays named against the inputs before the program runs on them
            check_inputs(export.model, samples, what="calibration set")
            export = export.verified(samples)
        for change in export.changes():
            if log is not None:
                log(change)
        return export.model
    from sensitivity.onnx_program import read_onnx

    return read_onnx(path)


def sensitivity_config(method: str, options: Mapping[str, Any]) -> Config:
    """The library configuration for an API method name and its options (ValueError if bad)."""
    from sensitivity.results import config_from_dict

    if method not in SENSITIVITY_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(SENSITIVITY_METHODS)}")
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a JSON object; got {type(options).__name__}")
    if "type" in options:
        raise ValueError(f"options must not set 'type': the method ({method}) picks the analysis")
    return config_from_dict({**options, "type": SENSITIVITY_METHODS[method]})


def plan_request(params: Mapping[str, Any]) -> PlanRequest:
    """The library's PlanRequest from a plan's API body (service/api/plans.PlanRequestIn); ValueError if
    bad. The one translation: the API's up-front check and the worker both use it."""
    from planner import PlanRequest

    options = params.get("options", {})
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a JSON object; got {type(options).__name__}")
    options = dict(options)
    seed = options.pop("seed", 0)
    constraints = {k: v for k, v in params.get("constraints", {}).items() if v is not None}
    # plans submitted before the metric field have none: auto, what they were measured with since;
    # before the exclude field, none: nothing was excluded; before sample_axes, none: the declared shapes';
    # before baseline, fp32: max_drop was the float model's
    return PlanRequest(
        method=params["method"],
        search=params["search"],
        candidates=params["candidates"],
        metric=params.get("metric", "auto"),
        baseline=params.get("baseline", "fp32"),
        objective=params.get("objective", "loss"),  # plans submitted before the field: loss
        exclude=params.get("exclude", ()),
        sample_axes=params.get("sample_axes") or {},
        seed=seed,
        sensitivity_options=options,
        **constraints,
    )
