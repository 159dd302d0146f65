"""``mpq sensitivity`` and ``mpq plan``: the libraries run locally, without the server.

``register(subparsers)`` adds both subcommands to the ``mpq`` parser (``service/cli/commands.py``).
Exit status: 0 success (for ``plan``: the plan meets the constraints), 2 bad input (the message
on stderr names what is wrong), 3 no configuration meets the constraints. Machine-readable
output (``--json``) goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from service.cli.progress import ProgressPrinter, describe_execution, shortened
from service.cli.remote import add_server_options, remote_plan, remote_sensitivity

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3
SENSITIVITY_METHODS = ("hawq_v1", "hawq_v2", "interlayer")
PLAN_METHODS = ("hawq_v2", "interlayer")
PLAN_METRICS = ("auto", "top1", "cosine", "neighbour_agreement", "step_agreement")  # planner.evaluate.METRICS
DEFAULT_CANDIDATES = "fp32,w8a8,w4a8,w8,w4"
# sensitivity.results' HVP_CHOICES and DEFAULT_MEMORY_BUDGET_MB, written out: the CLI does not
# import torch to build its parser (a test pins them equal).
HVP_CHOICES = ("auto", "double_backward", "forward_over_reverse")
DEFAULT_MEMORY_BUDGET_MB = 4096
MiB = 1024 * 1024
DATA_HELP = "calibration arrays (.npz): one per model input, optionally 'labels'"
SAMPLE_AXIS_HELP = (
    "the axis input NAME holds its samples on (AXIS an integer), or 'none' for an input shared by "
    "every sample (one value, e.g. a sample rate); repeatable. Default: read off the model's declared "
    "input shapes (axis 0, the first dynamic axis beside a fixed dim 0, none for a rank-0 input)"
)


class BadInput(ValueError):
    """Input the user must fix; the message is printed on stderr."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sensitivity`` and ``plan`` to the ``mpq`` command parser."""
    _add_sensitivity(subparsers)
    _add_plan(subparsers)


def _add_sensitivity(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "sensitivity",
        help="Hessian sensitivity of each layer (locally, or on a server with --server)",
        description="Compute per-layer Hessian traces (hawq_v2), top eigenvalues (hawq_v1) or the "
        "inter-layer terms g·Δ, G and Ω (interlayer) of a model on a calibration set.",
    )
    command.add_argument("model", metavar="MODEL", help="ONNX model (.onnx) or torch.export archive (.pt2)")
    command.add_argument("--data", required=True, metavar="CALIB.npz", help=DATA_HELP)
    command.add_argument("--method", choices=SENSITIVITY_METHODS, default="hawq_v2")
    command.add_argument("--bits", default="8,4", help="weight bit widths for interlayer (default 8,4)")
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


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "plan",
        help="choose, export and measure per-layer precisions (locally, or on a server with --server)",
        description="Search per-layer precisions under a budget, export the plan as a quantized ONNX "
        "model and measure its accuracy, size and latency with onnxruntime. Exit status 0 when the "
        "plan meets the constraints, 3 when no configuration can, 2 on bad input.",
    )
    command.add_argument("model", metavar="MODEL", help="ONNX model (.onnx)")
    command.add_argument("--data", required=True, metavar="CALIB.npz", help=DATA_HELP)
    command.add_argument("--eval-data", metavar="EVAL.npz", help="evaluation arrays (default: the calibration set)")
    command.add_argument(
        "--method",
        choices=PLAN_METHODS,
        default="hawq_v2",
        help="hawq_v2: diagonal Ω; interlayer: gradient and cross-layer terms (calibrate it on "
        "data the model was not trained on: docs/search.md)",
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
        "--metric",
        choices=PLAN_METRICS,
        default="auto",
        help="what --max-drop is measured on (default auto: top-1 for class scores, cosine for "
        "embeddings and dense maps, per-step agreement for [N, T, C] sequences)",
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
    command.add_argument("--max-probes", type=int, help="Hutchinson probes at most (sensitivity)")
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
    document = sensitivity_document(args.method, result)
    if args.json:
        print(json.dumps(document, allow_nan=False, default=_json_default))
    else:
        print(sensitivity_table(document))
    return EXIT_OK


def plan_command(args: argparse.Namespace, settings: Any = None) -> int:
    """``mpq plan``: search, export to ``--out``, measure; exit 3 when no configuration meets the constraints."""
    if getattr(args, "server", None):
        return remote_plan(args)
    import onnx

    from planner.plan import NoFeasiblePlan, plan

    progress = ProgressPrinter(sys.stderr)
    try:
        request = plan_request(args)
        model = load_onnx_file(args.model)
        calibration = load_npz(args.data, "--data")
        evaluation = load_npz(args.eval_data, "--eval-data") if args.eval_data else None
        _check_output(args.out)
        cached = _cached_sensitivity(args, request.sensitivity_config(), progress, request.sample_axes)
        result = plan(model, calibration, request, evaluation=evaluation, sensitivity=cached.result, progress=progress)
        cached.store_dict(result.sensitivity)
    except NoFeasiblePlan as error:
        progress.finish()
        return report_failure(f"no feasible plan: {error}", EXIT_INFEASIBLE, as_json=args.json, problem="infeasible")
    except (BadInput, ValueError, onnx.checker.ValidationError) as error:
        return _bad_input(error, progress, as_json=args.json)
    progress.finish()
    _write_atomically(Path(args.out), result.artifact_bytes)
    return report_plan(plan_document(result, args.out), as_json=args.json)


def report_plan(document: Mapping[str, Any], *, as_json: bool) -> int:
    """Print a plan (the JSON document or the summary), warn on stderr where it needs it, and
    return the exit code: the one step the local and the remote ``mpq plan`` share."""
    print(json.dumps(document, default=_json_default) if as_json else plan_summary(document))
    for warning in plan_warnings(document):
        print(f"mpq: warning: {warning}", file=sys.stderr)
    if not document["meets_constraints"]:
        print("mpq: the chosen plan does not meet the constraints (see the measured figures)", file=sys.stderr)
        return EXIT_INFEASIBLE
    return EXIT_OK


def plan_warnings(document: Mapping[str, Any]) -> list[str]:
    """What the user should know about a plan that met what was asked: a large measured drop
    under a size, BOPS or latency budget alone (nothing bounded it; the zoo's recogniser lost
    52.8 pp of step agreement under --max-size-mb without a word)."""
    measured = document["plan"]["measured"]
    if document["request"].get("max_drop") is not None or measured["drop"] <= LARGE_DROP_PP:
        return []
    warning = (
        f"the plan's {measured['metric_name']} dropped {measured['drop']:.2f} pp ({measured['metric']:.2f} % "
        f"against {measured['baseline']:.2f} % for the float model) and nothing bounded it: give --max-drop"
    )
    return [warning]


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
    key = cache.key(file_sha256(args.model), file_sha256(args.data), identity)
    result = cache.get(key)
    if result is not None:
        progress("sensitivity", 1.0, f"reusing the result cached in {cache.folder} (--no-cache recomputes it)")
    return _CachedSensitivity(cache, key, result)


def _bad_input(error: Exception, progress: ProgressPrinter, *, as_json: bool) -> int:
    progress.finish()
    return report_failure(str(error), EXIT_BAD_INPUT, as_json=as_json, problem="bad_input")


def report_failure(
    message: str, exit_code: int, *, as_json: bool, problem: str | None = None, job_id: str | None = None
) -> int:
    """Say why the command failed on stderr and, with ``--json``, as one JSON document on stdout
    (``jq -e`` in a pipeline reads it whatever the exit code); returns ``exit_code``. Local and
    remote commands fail through it."""
    print(f"mpq: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "exit_code": exit_code, "problem": problem, "job_id": job_id}))
    return exit_code


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


def load_onnx_file(path: str):
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
    if path.endswith(".pt2"):
        if not os.path.isfile(path):
            raise BadInput(f"MODEL: no such file {path!r}")
        if sample_axes:
            raise BadInput("--sample-axis applies to ONNX models; a torch.export archive takes samples on axis 0")
        from sensitivity.torch_program import load_exported

        return load_exported(path), load_npz(data, "--data")
    from planner.export import check_inputs
    from sensitivity.normalize import normalize_model, refuse_quantized
    from sensitivity.onnx_program import load_onnx

    model = load_onnx_file(path)
    refuse_quantized(model)  # whatever the data: no data makes a quantized model plannable
    calibration = load_npz(data, "--data")
    check_inputs(model, calibration, what=f"--data {data!r}", sample_axes=sample_axes)
    normalized = normalize_model(model, samples=calibration, sample_axes=sample_axes)
    for change in normalized.changes():
        print(f"mpq: normalised the model: {change}", file=sys.stderr)
    return load_onnx(normalized, sample_axes=sample_axes), calibration


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BadInput(f"--bits must be comma-separated integers, e.g. 8,4; got {text!r}") from None
    if not bits:
        raise BadInput("--bits lists no bit width")
    return bits


def sensitivity_config(args: argparse.Namespace):
    """The analysis configuration the options ask for (BadInput when they are invalid)."""
    from sensitivity.results import EigenConfig, InterLayerConfig, TraceConfig

    shared = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": args.device,
        "hvp_method": args.hvp_method,
        **budget_options(args),
    }
    try:
        if args.method == "hawq_v1":
            return EigenConfig(**shared, **_optional(tolerance=args.tol, max_iterations=args.max_probes))
        probes = _probe_options(args.max_probes)
        if args.method == "hawq_v2":
            return TraceConfig(**shared, **_optional(tolerance=args.tol), **probes)
        return InterLayerConfig(
            **shared,
            bits=parse_bits(args.bits),
            **_optional(trace_tolerance=args.tol),
            **{f"trace_{key}": value for key, value in probes.items()},
        )
    except ValueError as error:
        raise BadInput(f"invalid options: {error}") from None


def budget_options(args: argparse.Namespace) -> dict[str, Any]:
    """memory_budget_mb (None for --memory-budget-mb 0) and time_budget_s when given; hawq_v1 has no
    time budget (its iterations are bounded by --max-probes)."""
    options: dict[str, Any] = {"memory_budget_mb": args.memory_budget_mb or None}
    if args.time_budget_s is not None:
        options["time_budget_s"] = args.time_budget_s
    return options


def _probe_options(max_probes: int | None) -> dict[str, int]:
    """max_probes, lowering min_probes (default 8, at least 2) when the cap is below it."""
    if max_probes is None:
        return {}
    return {"max_probes": max_probes, "min_probes": max(2, min(8, max_probes))}


def _optional(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def plan_request(args: argparse.Namespace):
    from planner.plan import PlanRequest

    options = {"batch_size": args.batch_size, **budget_options(args)}
    if args.max_probes is not None:
        options.update({f"trace_{k}": v for k, v in _probe_options(args.max_probes).items()})
    size = None if args.max_size_mb is None else _positive(args.max_size_mb, "--max-size-mb") * MiB
    sample_axes = sample_axes_option(args.sample_axis)
    try:
        return PlanRequest(
            method=args.method,
            search=args.search,
            candidates=tuple(args.candidates.split(",")),
            max_size_bytes=None if size is None else int(math.floor(size)),
            max_bops=None if args.max_bops is None else int(_positive(args.max_bops, "--max-bops")),
            max_latency_ms=args.max_latency_ms,
            max_drop=args.max_drop,
            metric=args.metric,
            exclude=exclude_patterns(args.exclude),
            sample_axes=sample_axes,
            seed=args.seed,
            sensitivity_options=options,
            max_frontier_points=args.max_frontier_points,
            device=args.device,
        )
    except ValueError as error:
        raise BadInput(f"invalid options: {error}") from None


def sample_axes_option(values: list[str]) -> dict[str, int | None]:
    """Every --sample-axis NAME=AXIS as {name: axis} (None for 'none'); a name given twice is BadInput."""
    from sensitivity.samples import parse_sample_axis

    axes: dict[str, int | None] = {}
    for text in values:
        try:
            name, axis = parse_sample_axis(text)
        except ValueError as error:
            raise BadInput(str(error)) from None
        if name in axes and axes[name] != axis:
            raise BadInput(f"--sample-axis gives input {name!r} two axes: {axes[name]} and {axis}")
        axes[name] = axis
    return axes


def exclude_patterns(values: list[str]) -> tuple[str, ...]:
    """Every --exclude, each split at its commas (PlanRequest checks and bounds them)."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _positive(value: float, option: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{option} must be a positive number; got {value}")
    return value


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


def sensitivity_document(method: str, result) -> dict[str, Any]:
    """The ``--json`` document of ``mpq sensitivity``."""
    traces = {t.name: t for t in result.traces or ()}
    eigen = {e.name: e for e in result.eigenvalues or ()}
    layers = []
    for info in result.layers:
        trace = traces.get(info.name)
        row: dict[str, Any] = {
            "name": info.name,
            "node_name": info.node_name,
            "scope": info.scope,
            "op_type": info.op_type,
            "n_params": info.num_params,
            "trace": None if trace is None else trace.trace,
            "avg_trace": None if trace is None else trace.average_trace,
            "stderr": None if trace is None else trace.standard_error,
            "probes": None if trace is None else trace.num_probes,
        }
        if info.name in eigen:
            row["eigenvalue"] = eigen[info.name].eigenvalue
            row["eigen_iterations"] = eigen[info.name].iterations
            row["eigen_converged"] = eigen[info.name].converged
        layers.append(row)
    document: dict[str, Any] = {
        "method": method,
        "loss": result.loss,
        "loss_kind": result.loss_kind,
        "loss_reason": result.loss_reason,
        "layers": layers,
    }
    if result.interlayer is not None:
        terms = result.interlayer
        document["interlayer"] = {
            "bits": sorted({bits for _, bits in terms.labels}, reverse=True),
            "layers": list(dict.fromkeys(name for name, _ in terms.labels)),
            "labels": [[name, bits] for name, bits in terms.labels],
            "gradient_term": list(terms.gradient_terms),
            "omega": list(terms.omega),
            "G": [list(row) for row in terms.matrix],
            "symmetry_error": terms.symmetry_error,
        }
    document["timing"] = {
        **{f"{phase}_s": seconds for phase, seconds in result.timings.items()},
        "hvps": result.num_hvps,
        "device": result.device,
    }
    document["seed"] = result.seed
    document["versions"] = dict(result.versions)
    document["normalization"] = dict(result.normalization)
    document["execution"] = dict(result.execution)
    return document


def sensitivity_table(document: Mapping[str, Any]) -> str:
    """A readable table of the per-layer figures; the node column helps where exporters named the
    weights anonymously (onnx::MatMul_984)."""
    header = f"{'layer':<32} {'node':<40} {'op':<8} {'params':>9} {'avg trace':>12} {'± stderr':>11} {'probes':>6}"
    with_eigen = any("eigenvalue" in row for row in document["layers"])
    if with_eigen:
        header += f" {'eigenvalue':>12}"
    loss = f"{document.get('loss_kind', 'loss')} {document['loss']:.6g}"
    lines = [f"method {document['method']}, loss {loss}", header, "-" * len(header)]
    for row in document["layers"]:
        average = "-" if row["avg_trace"] is None else f"{row['avg_trace']:.4g}"
        error = "-" if row["stderr"] is None else f"{row['stderr'] / row['n_params']:.2g}"
        probes = "-" if row["probes"] is None else str(row["probes"])
        node = shortened(row.get("node_name") or "-", 40)
        line = (
            f"{row['name']:<32} {node:<40} {row['op_type']:<8} {row['n_params']:>9} {average:>12} {error:>11} "
            f"{probes:>6}"
        )
        if with_eigen:
            line += f" {row.get('eigenvalue', float('nan')):>12.4g}"
        lines.append(line)
    timing = document["timing"]
    seconds = timing.get("total_s", 0.0)
    lines.append(f"{timing['hvps']} Hessian-vector products in {seconds:.2f} s on {timing['device']}")
    execution = document.get("execution") or {}
    if execution:
        lines.append(describe_execution(execution))
    return "\n".join(lines)


def plan_document(result, artifact_path: str) -> dict[str, Any]:
    """The ``--json`` document of ``mpq plan``."""
    data = result.to_dict()
    return {
        "plan": data["plan"],
        "meets_constraints": data["meets_constraints"],
        "frontier": data["frontier"],
        "uniform": data["uniform"],
        "evaluations": data["evaluations"],
        "search": data["search"],
        "artifact": str(artifact_path),
        "artifact_sha256": data["artifact"]["sha256"],
        "request": data["request"],
        "versions": data["versions"],
        "timings": data["timings"],
        "activation_terms": data["activation_terms"],
        "excluded": data["excluded"],
        "layer_nodes": data["layer_nodes"],
    }


# A measured drop above this, with no --max-drop given, is worth a warning (percentage points).
LARGE_DROP_PP = 5.0


def plan_summary(document: Mapping[str, Any]) -> str:
    plan = document["plan"]
    predicted, measured = plan["predicted"], plan["measured"]
    nodes = document.get("layer_nodes") or {}
    excluded = {entry["layer"]: entry for entry in document.get("excluded") or ()}
    lines = [f"{'layer':<32} {'node':<40} candidate"]
    for name, candidate in plan["layers"].items():
        node = shortened((nodes.get(name) or {}).get("node_name") or "-", 40)
        note = f"  (excluded: {excluded[name]['reason']})" if name in excluded else ""
        lines.append(f"{name:<32} {node:<40} {candidate}{note}")
    lines.append(
        f"predicted: Ω {predicted['omega']:.4g}, ΔL {predicted['loss_change']:.4g}, "
        f"size {predicted['size_bytes']} B, {predicted['bops']:.4g} BOPS"
    )
    latency = measured["latency_ms"]
    lines.append(
        f"measured: {measured['metric_name']} {measured['metric']:.2f} % (float {measured['baseline']:.2f} %, "
        f"drop {measured['drop']:.2f} pp), artifact {measured['size_bytes']} B, latency p50 {latency['p50']:.3f} ms "
        f"(mean {latency['mean']:.3f}, p90 {latency['p90']:.3f}) on {latency['device']}"
    )
    if measured.get("metric_reason"):
        lines.append(f"metric: {measured['metric_name']} because {measured['metric_reason']}")
    lines.append(f"{document['evaluations']} evaluations; wrote {document['artifact']}")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
