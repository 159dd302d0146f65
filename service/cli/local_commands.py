"""``mpq sensitivity`` and ``mpq plan``: the libraries run locally, without the server.

``register(subparsers)`` adds both subcommands to the ``mpq`` parser (``service/cli/commands.py``).
Exit status: 0 success (for ``plan``: the plan meets the constraints), 2 bad input (the message
on stderr names what is wrong), 3 no configuration meets the constraints. Machine-readable
output (``--json``) goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.cli.installs import LOCAL, missing_install
from service.cli.options import BadInput, plan_request, sample_axes_option, sensitivity_config
from service.cli.output import (
    ExitCode,
    json_default,
    plan_document,
    report_failure,
    report_plan,
    sensitivity_document,
    sensitivity_table,
)
from service.cli.progress import ProgressPrinter
from service.cli.remote import add_server_options, remote_plan, remote_sensitivity

if TYPE_CHECKING:  # onnx and the libraries load when a command runs, not to build the parser
    import onnx

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]  # what add_subparsers() returns

SENSITIVITY_METHODS = ("hawq_v1", "hawq_v2", "interlayer", "fisher", "measured")
PLAN_METHODS = ("hawq_v2", "interlayer", "fisher", "measured")
DEFAULT_METHOD = "measured"  # planner.request.DEFAULT_METHOD (a test pins them equal)
PLAN_METRICS = ("auto", "top1", "cosine", "neighbour_agreement", "step_agreement")  # planner.evaluate.METRICS
PLAN_BASELINES = ("fp32", "fp16")  # planner.request.BASELINES
PLAN_OBJECTIVES = ("loss", "latency")  # planner.request.OBJECTIVES
DEFAULT_CANDIDATES = "fp32,w8a8,w4a8,w8,w4"
# sensitivity.results' HVP_CHOICES and DEFAULT_MEMORY_BUDGET_MB, written out: the CLI does not
# import torch to build its parser (a test pins them equal).
HVP_CHOICES = ("auto", "double_backward", "forward_over_reverse")
DEFAULT_MEMORY_BUDGET_MB = 4096
PT2_SAMPLE_AXIS = "--sample-axis applies to ONNX models; a torch.export archive takes samples on axis 0"
DATA_HELP = "calibration arrays (.npz): one per model input, optionally 'labels'"
SAMPLE_AXIS_HELP = (
    "the axis input NAME holds its samples on (AXIS an integer), or 'none' for an input shared by "
    "every sample (one value, e.g. a sample rate); repeatable. Default: read off the model's declared "
    "input shapes (axis 0, the first dynamic axis beside a fixed dim 0, none for a rank-0 input)"
)


def register(subparsers: Subcommands) -> None:
    """Add ``sensitivity`` and ``plan`` to the ``mpq`` command parser."""
    _add_sensitivity(subparsers)
    _add_plan(subparsers)


def _add_sensitivity(subparsers: Subcommands) -> None:
    command = subparsers.add_parser(
        "sensitivity",
        help="sensitivity of each layer (locally, or on a server with --server)",
        description="Compute each layer's loss change or KL quantized alone to each candidate in onnxruntime "
        "(measured, the default: it ranked layers best, docs/search.md), or per-layer Hessian traces "
        "(hawq_v2), top eigenvalues (hawq_v1), the inter-layer terms g·Δ, G and Ω (interlayer), or the "
        "empirical Fisher's ½ Σ F Δ² per layer and bit width (fisher) of a model on a calibration set.",
    )
    command.add_argument("model", metavar="MODEL", help="ONNX model (.onnx) or torch.export archive (.pt2)")
    command.add_argument("--data", required=True, metavar="CALIB.npz", help=DATA_HELP)
    command.add_argument("--method", choices=SENSITIVITY_METHODS, default=DEFAULT_METHOD)
    command.add_argument("--bits", help="weight bit widths for interlayer and fisher (default 8,4)")
    command.add_argument(
        "--candidates",
        help="measured: the candidates each layer is quantized to alone, comma-separated "
        "(default w8a8,w4a8,w8,w4; fp16 and w8a16 may be named too)",
    )
    command.add_argument(
        "--quantity",
        choices=("auto", "loss", "kl"),
        help="measured: the change measured, the calibration loss's or the KL from the float model's "
        "distribution (default auto: kl where the first output is class scores or probabilities, else loss)",
    )
    command.add_argument("--max-probes", type=int, help="Hutchinson probes (power iterations for hawq_v1) at most")
    command.add_argument("--tol", type=float, help="relative standard error (hawq_v1: relative change) to stop at")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="calibration samples per forward pass at most (lowered to fit --memory-budget-mb)",
    )
    command.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    command.add_argument("--sample-axis", action="append", default=[], metavar="NAME=AXIS", help=SAMPLE_AXIS_HELP)
    _add_budget_options(command)
    command.add_argument(
        "--hvp-method",
        choices=HVP_CHOICES,
        default="auto",
        help="Hessian-vector products by double backward or forward-over-reverse; auto times one "
        "probe of each on the model and takes the faster",
    )
    command.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    add_server_options(command)
    command.set_defaults(handler=sensitivity_command)


def _add_budget_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--memory-budget-mb",
        type=int,
        default=DEFAULT_MEMORY_BUDGET_MB,
        help=f"memory of the analysis in MiB (default {DEFAULT_MEMORY_BUDGET_MB}): the batch size "
        "and probes per pass are lowered to fit it, as measured; 0 uses --batch-size as given",
    )
    command.add_argument(
        "--time-budget-s",
        type=float,
        help="stop the Hutchinson probes after this many seconds, with the standard errors reached",
    )
    command.add_argument(
        "--no-cache",
        action="store_true",
        help="neither reuse nor store a finished sensitivity result (cached by model, data and "
        "settings in $MPQ_CACHE_DIR or ~/.cache/mpq/sensitivity)",
    )


def _add_plan(subparsers: Subcommands) -> None:
    command = subparsers.add_parser(
        "plan",
        help="choose, export and measure per-layer precisions (locally, or on a server with --server)",
        description="Search per-layer precisions under a budget, export the plan as a quantized ONNX "
        "model and measure its accuracy, size and latency with onnxruntime. Exit status 0 when the "
        "plan meets the constraints, 3 when no configuration can, 2 on bad input.",
    )
    command.add_argument(
        "model", metavar="MODEL", help="ONNX model (.onnx) or torch.export archive (.pt2, exported to ONNX first)"
    )
    command.add_argument("--data", required=True, metavar="CALIB.npz", help=DATA_HELP)
    command.add_argument("--eval-data", metavar="EVAL.npz", help="evaluation arrays (default: the calibration set)")
    command.add_argument(
        "--method",
        choices=PLAN_METHODS,
        default=DEFAULT_METHOD,
        help="measured (default): diagonal, Ω = 2ΔL of each layer quantized alone to each candidate, "
        "in onnxruntime (docs/search.md, 'Defaults by evidence'); hawq_v2: diagonal Ω from Hessian "
        "traces; interlayer: gradient and cross-layer terms (calibrate it on data the model was not "
        "trained on: docs/search.md); fisher: diagonal, Ω = Σ F Δ² from the "
        "empirical Fisher (needs labels or a classifier's logits)",
    )
    command.add_argument("--search", choices=("pareto", "bisection"), default="pareto")
    command.add_argument("--candidates", default=DEFAULT_CANDIDATES, help=f"comma-separated ({DEFAULT_CANDIDATES})")
    budget = command.add_mutually_exclusive_group()
    budget.add_argument(
        "--max-size-mb",
        type=float,
        help="budget: the model file in MiB (computed, then checked on the artifact: docs/search.md)",
    )
    budget.add_argument("--max-bops", type=float, help="budget: bit operations per sample")
    budget.add_argument("--max-latency-ms", type=float, help="budget: measured median latency per batch")
    command.add_argument("--max-drop", type=float, help="largest drop in percentage points (bisection needs it)")
    command.add_argument(
        "--objective",
        choices=PLAN_OBJECTIVES,
        default="loss",
        help="loss: the least predicted loss within the constraints; latency: the fastest configuration "
        "measured against the float model (interleaved) within them, never one slower than float; the "
        "search then predicts latency from a measured per-layer latency table (docs/search.md)",
    )
    command.add_argument(
        "--metric",
        choices=PLAN_METRICS,
        default="auto",
        help="what --max-drop is measured on (default auto: top-1 for class scores, cosine for "
        "embeddings and dense maps, per-step agreement for [N, T, C] sequences)",
    )
    command.add_argument(
        "--baseline",
        choices=PLAN_BASELINES,
        default="fp32",
        help="what --max-drop is measured against: the float model (fp32, default) or every layer at fp16; "
        "the plan states its drop and latency against both",
    )
    command.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep these layers fp32: a layer (weight initializer) name, a node name or a glob "
        "pattern (* and ?) matched against both; repeat it or separate patterns by commas",
    )
    command.add_argument("--sample-axis", action="append", default=[], metavar="NAME=AXIS", help=SAMPLE_AXIS_HELP)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--max-probes", type=int, help="Hutchinson probes at most (hawq_v2, interlayer)")
    command.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (sensitivity)")
    command.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_budget_options(command)
    command.add_argument("--max-frontier-points", type=int, default=8, help="frontier points to measure")
    command.add_argument("--out", default="quantized.onnx", help="where to write the quantized model")
    command.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    add_server_options(command)
    command.set_defaults(handler=plan_command)


# ---------------------------------------------------------------------------------------------
# Handlers


def sensitivity_command(args: argparse.Namespace, settings: Any = None) -> int:
    """``mpq sensitivity``: per-layer sensitivities as a table or one JSON document."""
    if getattr(args, "server", None):
        return remote_sensitivity(args)
    if (code := _missing_libraries("mpq sensitivity", args)) is not None:
        return code
    import planner.measured  # noqa: F401  # registers the measured analysis with compute_sensitivity
    from sensitivity.run import compute_sensitivity

    progress = ProgressPrinter(sys.stderr)
    try:
        config = sensitivity_config(args)
        axes = sample_axes_option(args.sample_axis)
        program, calibration = load_program(args.model, args.data, axes)
        cached = _cached_sensitivity(args, config, progress, axes)
        result = cached.result or compute_sensitivity(program, calibration, config, progress)
    except (BadInput, ValueError) as error:
        return _bad_input(error, progress, as_json=args.json)
    cached.store(result)
    progress.finish()
    document = sensitivity_document(args.method, result.to_dict())
    if args.json:
        print(json.dumps(document, allow_nan=False, default=json_default))
    else:
        print(sensitivity_table(document))
    return ExitCode.OK


def plan_command(args: argparse.Namespace, settings: Any = None) -> int:
    """``mpq plan``: search, export to ``--out``, measure; exit 3 when no configuration meets the constraints."""
    if getattr(args, "server", None):
        return remote_plan(args)
    if (code := _missing_libraries("mpq plan", args)) is not None:
        return code
    import onnx

    from planner import NoFeasiblePlan, plan

    progress = ProgressPrinter(sys.stderr)
    try:
        request = plan_request(args)
        if args.model.endswith(".pt2") and request.sample_axes:
            raise BadInput(PT2_SAMPLE_AXIS)
        if args.model.endswith(".pt2"):
            calibration = load_npz(args.data, "--data")
            model = load_pt2_file(args.model, calibration, "calibration set")
        else:
            model = load_onnx_file(args.model)
            calibration = load_npz(args.data, "--data")
        evaluation = load_npz(args.eval_data, "--eval-data") if args.eval_data else None
        _check_output(args.out)
        cached = _cached_sensitivity(args, request.sensitivity_config(), progress, request.sample_axes)
        result = plan(model, calibration, request, evaluation=evaluation, sensitivity=cached.result, progress=progress)
        cached.store_dict(result.sensitivity)
    except NoFeasiblePlan as error:
        progress.finish()
        return report_failure(
            f"no feasible plan: {error}", ExitCode.INFEASIBLE, as_json=args.json, problem="infeasible"
        )
    except (BadInput, ValueError, onnx.checker.ValidationError) as error:
        return _bad_input(error, progress, as_json=args.json)
    progress.finish()
    _write_atomically(Path(args.out), result.artifact_bytes)
    data = result.to_dict()
    document = plan_document(data, artifact=args.out, artifact_sha256=data["artifact"]["sha256"])
    return report_plan(document, as_json=args.json)


def _missing_libraries(command: str, args: argparse.Namespace) -> int | None:
    """Exit 2 with one line when the libraries' stack is not installed (the light client install:
    ``pip install mpq``), before anything imports it; None when it is."""
    message = missing_install(LOCAL, f"{command} without --server", ", or run it on a server with --server URL")
    if message is None:
        return None
    return report_failure(message, ExitCode.BAD_INPUT, as_json=args.json, problem="missing_install")


class _CachedSensitivity:
    """The cached result for a command's model, data and configuration (``result`` None on a miss
    or with --no-cache), and storing a freshly computed one."""

    def __init__(self, cache: Any, key: str | None, result: Any) -> None:
        self.cache, self.key, self.result = cache, key, result

    def store(self, result: Any) -> None:
        if self.key is not None and self.result is None:
            self.cache.put(self.key, result)

    def store_dict(self, data: Mapping[str, Any]) -> None:
        if self.key is not None and self.result is None:
            from sensitivity.results import SensitivityResult

            self.cache.put(self.key, SensitivityResult.from_dict(data))


def _cached_sensitivity(
    args: argparse.Namespace, config: Any, progress: ProgressPrinter, sample_axes: Mapping[str, int | None]
) -> _CachedSensitivity:
    from service.cli.local_cache import SensitivityCache, file_sha256

    if args.no_cache:
        return _CachedSensitivity(None, None, None)
    cache = SensitivityCache()
    # the sample axes change which values form a sample; without any, the key is what it always was
    identity = {**config.to_dict(), **({"sample_axes": dict(sample_axes)} if sample_axes else {})}
    if args.model.endswith(".pt2"):  # analysed on its ONNX export: not a result stored from the torch program
        identity["pt2_program"] = "onnx_export"
    key = cache.key(file_sha256(args.model), file_sha256(args.data), identity)
    result = cache.get(key)
    if result is not None:
        progress("sensitivity", 1.0, f"reusing the result cached in {cache.folder} (--no-cache recomputes it)")
    return _CachedSensitivity(cache, key, result)


def _bad_input(error: Exception, progress: ProgressPrinter, *, as_json: bool) -> int:
    progress.finish()
    return report_failure(str(error), ExitCode.BAD_INPUT, as_json=as_json, problem="bad_input")


# ---------------------------------------------------------------------------------------------
# Inputs


def load_npz(path: str, option: str) -> dict[str, np.ndarray]:
    """Arrays of an .npz file, loaded without pickle (object arrays are refused)."""
    if not os.path.isfile(path):
        raise BadInput(f"{option}: no such file {path!r}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise BadInput(f"{option}: {path!r} is a single .npy array; give an .npz, one array per model input")
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    except BadInput:
        raise
    except (ValueError, OSError, EOFError) as error:
        raise BadInput(f"{option}: {path!r} is not a readable .npz archive without pickled objects ({error})") from None


def load_pt2_file(path: str, calibration: Mapping[str, np.ndarray], what: str) -> onnx.ModelProto:
    """A torch.export archive (``.pt2``) loaded without unpickling and exported to ONNX by torch's
    exporter, the arrays checked against its inputs (``what`` names them in the message), then the
    export checked against the program on the first calibration samples (``sensitivity.torch_onnx``;
    what changed goes to stderr). From here on it runs the pipeline of an ONNX model."""
    from planner.export import check_inputs
    from sensitivity.torch_onnx import load_exported_onnx

    if not os.path.isfile(path):
        raise BadInput(f"MODEL: no such file {path!r}")
    export = load_exported_onnx(path)
    check_inputs(export.model, calibration, what=what)
    export = export.verified(calibration)
    for change in export.changes():
        print(f"mpq: {change}", file=sys.stderr)
    return export.model


def load_onnx_file(path: str) -> onnx.ModelProto:
    """Parse an ONNX file (never executed); BadInput when missing or not ONNX."""
    import onnx

    if not os.path.isfile(path):
        raise BadInput(f"MODEL: no such file {path!r}")
    try:
        model = onnx.load(path)
    except Exception as error:
        raise BadInput(f"MODEL: {path!r} is not a valid ONNX model ({type(error).__name__}: {error})") from None
    if not model.graph.node:
        raise BadInput(f"MODEL: {path!r} is not a valid ONNX model (its graph has no nodes)")
    return model


def load_program(
    path: str, data: str, sample_axes: Mapping[str, int | None] | None = None
) -> tuple[Any, dict[str, np.ndarray]]:
    """An ONNX model or a torch.export archive as a differentiable program, and the --data arrays.

    ONNX is normalised (``sensitivity.normalize``) after the arrays are checked against its
    inputs (mismatches are named before the analysis starts); an opset upgrade is checked on
    the first samples. A quantized model is refused there (ValueError: exit 2, no traceback).
    ``sample_axes`` (``--sample-axis``) override the ONNX model's own (``sensitivity.samples``).
    """
    from planner.export import check_inputs
    from sensitivity.normalize import normalize_model, refuse_quantized
    from sensitivity.onnx_program import load_onnx

    if path.endswith(".pt2"):
        if sample_axes:
            raise BadInput(PT2_SAMPLE_AXIS)
        calibration = load_npz(data, "--data")
        model = load_pt2_file(path, calibration, f"--data {data!r}")
    else:
        model = load_onnx_file(path)
        refuse_quantized(model)  # whatever the data: no data makes a quantized model plannable
        calibration = load_npz(data, "--data")
        check_inputs(model, calibration, what=f"--data {data!r}", sample_axes=sample_axes)
    normalized = normalize_model(model, samples=calibration, sample_axes=sample_axes)
    for change in normalized.changes():
        print(f"mpq: normalised the model: {change}", file=sys.stderr)
    return load_onnx(normalized, sample_axes=sample_axes), calibration


def _check_output(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise BadInput(f"--out: the directory {str(parent)!r} does not exist")


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it: never a half-written artifact."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# Output
