"""The one verb: ``compute_sensitivity(program, calibration, config) -> SensitivityResult``.

The configuration's type selects the analysis through a registry of handlers
(``register_handler``), torchao style: TraceConfig -> Hutchinson traces, EigenConfig ->
power-iteration eigenvalues, InterLayerConfig -> traces, g·Δ, G and Ω,
FisherConfig -> empirical Fisher diagonal and ½ Σ FΔ² per (layer, bits). MeasuredConfig's handler
(each layer quantized alone in onnxruntime) is ``planner.measured``'s: it needs the exporter, which this
library never imports, and registers itself when ``planner.measured`` is imported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sensitivity.budget import TIMED_REPEATS, PassPlan, fastest_of, plan_passes
from sensitivity.eigen import top_eigenvalues
from sensitivity.fisher import fisher_terms
from sensitivity.hvp import HessianVectorProducts
from sensitivity.interlayer import interlayer_terms
from sensitivity.layers import QUANTIZABLE_OPS
from sensitivity.losses import LABELS, CalibrationLoss
from sensitivity.program import Program
from sensitivity.results import (
    Config,
    EigenConfig,
    FisherConfig,
    InterLayerConfig,
    LayerInfo,
    MeasuredConfig,
    SensitivityResult,
    TraceConfig,
)
from sensitivity.samples import sample_count
from sensitivity.traces import hutchinson_traces
from sensitivity.versions import versions as package_versions

Progress = Callable[[str, float, str], None]


def no_progress(phase: str, fraction: float, message: str) -> None:
    pass


@dataclass
class Context:
    """What a handler works with; it fills ``fields`` (SensitivityResult fields), ``timings`` and
    ``execution`` (how the run went: see SensitivityResult)."""

    program: Program
    hvp: HessianVectorProducts
    progress: Progress
    calibration: Mapping[str, np.ndarray] = field(default_factory=dict)  # as given to compute_sensitivity
    fields: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    execution: dict[str, Any] = field(default_factory=dict)

    def timed(self, phase: str, compute: Callable[[], Any]) -> Any:
        self.progress(phase, 0.0, "started")
        start = time.perf_counter()
        value = compute()
        self.timings[phase] = time.perf_counter() - start
        self.progress(phase, 1.0, f"done in {self.timings[phase]:.2f} s")
        return value


Handler = Callable[[Context, Any], None]
_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type) -> Callable[[Handler], Handler]:
    """Register ``handler(context, config)`` as the analysis for ``config_type``."""

    def decorate(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler

    return decorate


@register_handler(TraceConfig)
def _traces(context: Context, config: TraceConfig) -> None:
    context.fields["traces"] = context.timed(
        "traces",
        lambda: hutchinson_traces(
            context.hvp,
            seed=config.seed,
            tolerance=config.tolerance,
            min_probes=config.min_probes,
            max_probes=config.max_probes,
            time_budget_s=config.time_budget_s,
            progress=context.progress,
            report=context.execution.setdefault("traces", {}),
        ),
    )


@register_handler(EigenConfig)
def _eigenvalues(context: Context, config: EigenConfig) -> None:
    context.fields["eigenvalues"] = context.timed(
        "eigenvalues",
        lambda: top_eigenvalues(
            context.hvp,
            seed=config.seed,
            tolerance=config.tolerance,
            max_iterations=config.max_iterations,
            progress=context.progress,
        ),
    )


@register_handler(InterLayerConfig)
def _interlayer(context: Context, config: InterLayerConfig) -> None:
    _traces(context, config.trace_config())
    context.fields["interlayer"] = context.timed(
        "interlayer",
        lambda: interlayer_terms(
            context.hvp, context.program.layers, config.bits, context.fields["traces"], progress=context.progress
        ),
    )


@register_handler(FisherConfig)
def _fisher(context: Context, config: FisherConfig) -> None:
    hvp = context.hvp
    context.fields["fisher"] = context.timed(
        "fisher",
        lambda: fisher_terms(hvp, context.program.layers, config.bits, hvp.probes_per_pass, progress=context.progress),
    )


def resolve_device(device: str) -> torch.device:
    """ "auto" is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    """Versions stored with every sensitivity result."""
    return package_versions("mpq", "torch", "onnx", "onnxruntime")


def validate_calibration(program: Program, calibration: Mapping[str, np.ndarray]) -> int:
    """Check the arrays against the program's inputs; returns the number of samples.

    Every input needs an array, only inputs and ``labels`` may be present, every array is
    a numpy array, the per-sample ones (``program.sample_axes``; labels on axis 0) hold the same
    non-zero number of samples, and labels are 1-D integers. The label range is checked
    against the model's class count when the loss is built.
    """
    if not isinstance(calibration, Mapping):
        raise ValueError(f"calibration must map names to numpy arrays; got {type(calibration).__name__}")
    expected = set(program.input_names)
    missing = sorted(expected - set(calibration))
    extra = sorted(set(calibration) - expected - {LABELS})
    if missing or extra:
        raise ValueError(
            f"calibration arrays do not match the model inputs {list(program.input_names)}: "
            f"missing {missing}, unexpected {extra} (only inputs and {LABELS!r} are allowed)"
        )
    for name, array in calibration.items():
        if not isinstance(array, np.ndarray):
            raise ValueError(f"calibration array {name!r} must be a numpy array; got {type(array).__name__}")
    axes = program.sample_axes
    count = sample_count(calibration, axes, what="calibration arrays")
    if count == 0:
        raise ValueError("calibration arrays are empty")
    labels = calibration.get(LABELS)
    for name, array in calibration.items():
        _check_finite(name, array, axes.get(name, 0))
    if labels is not None and (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{LABELS!r} must be a 1-D integer array; got dtype {labels.dtype}, shape {labels.shape}")
    if labels is not None and labels.min() < 0:
        raise ValueError(f"{LABELS!r} must be non-negative class indices; got minimum {labels.min()}")
    return count


def _check_finite(name: str, array: np.ndarray, axis: int | None) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        return
    if axis is None:  # shared by every sample
        if not np.isfinite(array).all():
            raise ValueError(non_finite_message(name, None, 0, 0, 0))
        return
    finite = np.isfinite(np.moveaxis(array, axis, 0)).reshape(array.shape[axis], -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(non_finite_message(name, axis, len(bad), len(finite), int(bad[0])))


def non_finite_message(name: str, axis: int | None, bad: int, total: int, first: int) -> str:
    """The error for a calibration array holding NaN or infinite values: in ``bad`` of ``total``
    samples on ``axis``, the first being ``first`` (the server words its upload check alike)."""
    if axis is None:
        return f"calibration array {name!r} (shared by every sample) holds NaN or infinite values"
    return (
        f"calibration array {name!r} holds NaN or infinite values in {bad} of {total} samples "
        f"(first: sample {first}); every sensitivity would be NaN"
    )


def _check_some_curvature(traces: Any) -> None:
    """Every trace exactly 0 means the loss does not depend on any layer's weights through
    differentiable ops (an ArgMax, Round or integer Cast between them and the output): the ranking
    would be meaningless, so it is an error rather than a result."""
    if traces and all(t.trace == 0.0 and t.standard_error == 0.0 for t in traces):
        raise ValueError(
            "every layer's Hessian trace is exactly 0: the loss does not depend differentiably on any "
            "layer's weights (is there an ArgMax, Round or integer Cast between them and the output?)"
        )


def program_on_device(program: Program, device: torch.device) -> Program:
    current = next(iter(program.layer_weights.values())).device
    return program if current == device else program.to(device)


def compute_sensitivity(
    program: Program,
    calibration: Mapping[str, np.ndarray],
    config: Config,
    progress: Progress | None = None,
) -> SensitivityResult:
    """Run the analysis ``config`` selects on ``program`` over the calibration set.

    ``calibration`` maps each of ``program.input_names`` (and optionally ``labels``) to a
    numpy array, samples on the input's ``program.sample_axes`` axis (first axis by default). ``progress(phase, fraction, message)`` is
    called as phases advance. Raises ``ValueError`` for bad calibration data and
    ``TypeError`` for a configuration type with no handler.
    """
    handler = _HANDLERS.get(type(config))
    if handler is None:
        hint = " (import planner.measured, which registers it)" if type(config).__name__ == "MeasuredConfig" else ""
        raise TypeError(f"no handler for {type(config).__name__}{hint}; registered: {[t.__name__ for t in _HANDLERS]}")
    progress = progress or no_progress
    if not program.layers:
        raise ValueError(
            f"the model has no quantizable layers (a {'/'.join(sorted(QUANTIZABLE_OPS))} node with a "
            "constant weight of 2 or more dimensions): there is nothing to analyse"
        )
    validate_calibration(program, calibration)
    device = resolve_device(config.device)
    program = program_on_device(program, device)
    start = time.perf_counter()
    passes = (
        _no_hvp_passes(config)
        if isinstance(config, MeasuredConfig)
        else plan_passes(
            program,
            calibration,
            batch_size=config.batch_size,
            probes_per_pass=config.probes_per_pass,
            hvp_method=config.hvp_method,
            memory_budget_mb=config.memory_budget_mb,
            device=device,
            task=config.task,
            progress=progress,
        )
    )
    measured = time.perf_counter()
    progress("prepare", 0.0, "computing the full-precision loss")
    loss = CalibrationLoss(program, calibration, passes.batch_size, device, config.task)
    hvp = HessianVectorProducts(loss, method=passes.hvp_method, probes_per_pass=passes.probes_per_pass)
    context = Context(
        program,
        hvp,
        progress,
        calibration,
        timings={"budget": measured - start, "prepare": time.perf_counter() - measured},
    )
    handler(context, config)
    _check_some_curvature(context.fields.get("traces"))
    context.timings["total"] = time.perf_counter() - start
    progress("done", 1.0, f"{hvp.num_hvps} Hessian-vector products")
    execution = _execution(passes, context, hvp)
    return SensitivityResult(
        config=config,
        layers=tuple(
            LayerInfo(
                layer.name,
                layer.op_type,
                tuple(layer.shape),
                layer.num_params,
                layer.channel_axis,
                node_name=layer.node_name,
                scope=layer.scope,
            )
            for layer in program.layers
        ),
        loss_kind=loss.kind,
        loss_reason=loss.reason,
        loss=loss.value(),
        num_samples=loss.num_samples,
        timings=context.timings,
        num_hvps=hvp.num_hvps,
        versions=versions(),
        device=describe_device(device),
        normalization=_normalization(program),
        execution=execution,
        **context.fields,
    )


def _no_hvp_passes(config: MeasuredConfig) -> PassPlan:
    """The measured analysis runs onnxruntime, not Hessian-vector products: timing the HVP methods and
    sizing probes for them would be wasted (4.2 of a 6.1 s run on a two-layer MLP)."""
    return PassPlan(config.batch_size, 1, "double_backward", {"skipped": "measured runs no Hessian-vector products"})


def _execution(passes: PassPlan, context: Context, hvp: HessianVectorProducts) -> dict[str, Any]:
    """The run's batch size, probes per pass and HVP method with what chose them, its peak memory,
    and (for traces) the cost of a probe in gradients of the whole calibration loss."""
    execution = {
        "batch_size": passes.batch_size,
        "probes_per_pass": passes.probes_per_pass,
        "hvp_method": passes.hvp_method,
        "budget": passes.report,
        **context.execution,
    }
    peak = _peak_rss_mb()
    if peak is not None:
        execution["peak_rss_mb"] = peak
    traces = context.execution.get("traces")
    if traces and traces.get("probes") and "traces" in context.timings:
        gradient = fastest_of(hvp.gradient, TIMED_REPEATS)
        per_probe = context.timings["traces"] / traces["probes"]
        execution["gradient_s"] = round(gradient, 6)
        execution["probe_cost_gradients"] = round(per_probe / gradient, 3) if gradient > 0 else None
    return execution


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory so far (Linux reports kB; other systems are not measured)."""
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _normalization(program: Program) -> dict[str, Any]:
    """What normalisation changed in an ONNX program's model (``OnnxProgram.normalization``); other
    programs (torch.export) have no such step."""
    normalized = getattr(program, "normalization", None)
    return normalized.to_dict() if normalized is not None else {}
