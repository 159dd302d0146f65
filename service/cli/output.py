"""What ``mpq sensitivity`` and ``mpq plan`` print, locally or with ``--server``: the exit codes, the JSON
documents and tables, and the one way a command fails (``report_failure``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from enum import IntEnum
from typing import Any

import numpy as np

from service.formatting import describe_execution, latency_ratio, shortened, slower_than_float_warning


class ExitCode(IntEnum):
    """The exit status of every ``mpq`` command (docs/ci.md): pipelines branch on it."""

    OK = 0
    FAILED = 1  # anything else: the server unreachable, a job that crashed
    BAD_INPUT = 2  # the message names what to fix
    INFEASIBLE = 3  # no configuration meets the constraints
    INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it: 128 + the signal (service/cli/signals.py)
    TERMINATED = 143  # SIGTERM


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


def report_plan(document: Mapping[str, Any], *, as_json: bool) -> int:
    """Print a plan (the JSON document or the summary), warn on stderr where it needs it, and
    return the exit code: the one step the local and the remote ``mpq plan`` share."""
    print(json.dumps(document, default=json_default) if as_json else plan_summary(document))
    for warning in plan_warnings(document):
        print(f"mpq: warning: {warning}", file=sys.stderr)
    if not document["meets_constraints"]:
        print("mpq: the chosen plan does not meet the constraints (see the measured figures)", file=sys.stderr)
        return ExitCode.INFEASIBLE
    return ExitCode.OK


def plan_document(
    result: Mapping[str, Any], *, artifact: str, artifact_sha256: str, plan_id: str | None = None
) -> dict[str, Any]:
    """The ``--json`` document of ``mpq plan``, local or remote alike: built from the planner's result
    (``planner.PlanResult.to_dict()``, the local run's or the one the server stored with the plan),
    the path the artifact was written to and its sha256; a remote plan adds its id."""
    run = result["run"]
    document = {
        "plan": result["plan"],
        "meets_constraints": result["meets_constraints"],
        "frontier": result["frontier"],
        "uniform": result["uniform"],
        "evaluations": run["evaluations"],
        "search": run["search"],
        "artifact": str(artifact),
        "artifact_sha256": artifact_sha256,
        "request": result["request"],
        "versions": run["versions"],
        "timings": run["timings"],
        "activation_terms": result["activation_terms"],
        "excluded": result["excluded"],
        "layer_nodes": result["layer_nodes"],
        "baselines": result.get("baselines") or {},  # plans stored before baselines existed have none
    }
    if plan_id is not None:
        document["plan_id"] = plan_id
    return document


def plan_warnings(document: Mapping[str, Any]) -> list[str]:
    """What the user should know about a plan that met what was asked: a large measured drop
    under a size, BOPS or latency budget alone (nothing bounded it; the zoo's recogniser lost
    52.8 pp of step agreement under --max-size-mb without a word); a plan measured slower than the
    float model (w8 measured 1.3-1.5x float on every CNN measured, issue 13)."""
    measured = document["plan"]["measured"]
    warnings = [slower_than_float_warning(measured)]
    if document["request"].get("max_drop") is None and measured["drop"] > LARGE_DROP_PP:
        warnings.append(
            f"the plan's {measured['metric_name']} dropped {measured['drop']:.2f} pp ({measured['metric']:.2f} % "
            f"against {measured['baseline']:.2f} % for the float model) and nothing bounded it: give --max-drop"
        )
    return [warning for warning in warnings if warning]


# A measured drop above this, with no --max-drop given, is worth a warning (percentage points).
LARGE_DROP_PP = 5.0


def sensitivity_document(method: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--json`` document of ``mpq sensitivity``, from the result as data
    (``sensitivity.results.SensitivityResult.to_dict()``: the local run's, or the one the server
    stored, read as ``SensitivityResult.from_dict`` reads it, so results stored before a field
    existed still print). No library is imported: the light client install prints it too."""
    traces = {t["name"]: t for t in result.get("traces") or ()}
    eigen = {e["name"]: e for e in result.get("eigenvalues") or ()}
    layers = []
    for info in result["layers"]:
        trace = traces.get(info["name"])
        row: dict[str, Any] = {
            "name": info["name"],
            "node_name": info.get("node_name") or "",
            "scope": info.get("scope") or "",
            "op_type": info["op_type"],
            "n_params": info["num_params"],
            "trace": None if trace is None else trace["trace"],
            "avg_trace": None if trace is None else trace["trace"] / trace["num_params"],
            "stderr": None if trace is None else trace["standard_error"],
            "probes": None if trace is None else trace["num_probes"],
        }
        if info["name"] in eigen:
            row["eigenvalue"] = eigen[info["name"]]["eigenvalue"]
            row["eigen_iterations"] = eigen[info["name"]]["iterations"]
            row["eigen_converged"] = eigen[info["name"]]["converged"]
        layers.append(row)
    document: dict[str, Any] = {
        "method": method,
        "loss": result["loss"],
        "loss_kind": result["loss_kind"],
        "loss_reason": result.get("loss_reason", ""),
        "layers": layers,
    }
    if (terms := result.get("interlayer")) is not None:
        labels = [(name, bits) for name, bits in terms["labels"]]
        document["interlayer"] = {
            "bits": sorted({bits for _, bits in labels}, reverse=True),
            "layers": list(dict.fromkeys(name for name, _ in labels)),
            "labels": [[name, bits] for name, bits in labels],
            "gradient_term": list(terms["gradient_terms"]),
            "omega": list(terms["omega"]),
            "G": [list(row) for row in terms["matrix"]],
            "symmetry_error": terms["symmetry_error"],
        }
    if (fisher := result.get("fisher")) is not None:
        document["fisher"] = fisher_document(fisher)
    if (measured := result.get("measured")) is not None:
        document["measured"] = measured_document(measured)
    document["timing"] = {
        **{f"{phase}_s": seconds for phase, seconds in (result.get("timings") or {}).items()},
        "hvps": result.get("num_hvps", 0),
        "device": result.get("device", ""),
    }
    document["seed"] = result["config"].get("seed", 0)  # 0: the configurations' default
    document["versions"] = dict(result.get("versions") or {})
    document["normalization"] = dict(result.get("normalization") or {})
    document["execution"] = dict(result.get("execution") or {})
    return document


def fisher_document(terms: Mapping[str, Any]) -> dict[str, Any]:
    """The empirical Fisher's part of the document: ½ Σ Fᵢᵢ Δᵢ² and its standard error per (layer, bits),
    and each layer's Fisher trace Σ Fᵢᵢ."""
    labels = [(name, bits) for name, bits in terms["labels"]]
    return {
        "bits": sorted({bits for _, bits in labels}, reverse=True),
        "labels": [[name, bits] for name, bits in labels],
        "loss_change": list(terms["loss_changes"]),
        "stderr": list(terms["standard_errors"]),
        "fisher_trace": dict(zip(terms["layer_names"], terms["fisher_traces"])),
        "samples": terms["num_samples"],
    }


def measured_document(terms: Mapping[str, Any]) -> dict[str, Any]:
    """The measured part of the document: each layer's loss change quantized alone to each candidate, ± SE."""
    labels = [(name, candidate) for name, candidate in terms["labels"]]
    return {
        "candidates": list(dict.fromkeys(candidate for _, candidate in labels)),
        "layers": list(dict.fromkeys(name for name, _ in labels)),
        "labels": [[name, candidate] for name, candidate in labels],
        "loss_change": list(terms["loss_changes"]),
        "stderr": list(terms["standard_errors"]),
        "samples": terms["num_samples"],
        "quantity": terms.get("quantity", "loss"),  # results stored before quantity existed measured the loss
    }


def measured_table(measured: Mapping[str, Any]) -> list[str]:
    """One line per layer: its measured loss change ± its standard error at each candidate."""
    candidates = measured["candidates"]
    values = {
        (name, c): (change, error)
        for (name, c), change, error in zip(measured["labels"], measured["loss_change"], measured["stderr"])
    }
    symbol = "ΔL" if measured.get("quantity", "loss") == "loss" else "KL"  # kl: from the float model's distribution
    header = f"{'layer':<32} " + " ".join(f"{f'{symbol} at {c}':>22}" for c in candidates)
    title = f"measured in onnxruntime, each layer alone, {measured['samples']} samples: {symbol} ± standard error"
    lines = [title, header, "-" * len(header)]
    for name in measured["layers"]:
        cells = [f"{values[(name, c)][0]:>11.4g} ± {values[(name, c)][1]:<8.2g}" for c in candidates]
        lines.append(f"{name:<32} " + " ".join(cells))
    return lines


def fisher_table(fisher: Mapping[str, Any]) -> list[str]:
    """One line per layer: the predicted loss change ± its standard error at each bit width."""
    bits = fisher["bits"]
    values = {
        (name, b): (change, error)
        for (name, b), change, error in zip(fisher["labels"], fisher["loss_change"], fisher["stderr"])
    }
    header = f"{'layer':<32} " + " ".join(f"{f'ΔL at {b} bits':>22}" for b in bits)
    lines = [f"empirical Fisher, {fisher['samples']} samples: ½ Σ F Δ² ± standard error", header, "-" * len(header)]
    for name in fisher["fisher_trace"]:
        cells = [f"{values[(name, b)][0]:>11.4g} ± {values[(name, b)][1]:<8.2g}" for b in bits]
        lines.append(f"{name:<32} " + " ".join(cells))
    return lines


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
    if (fisher := document.get("fisher")) is not None:
        lines += fisher_table(fisher)
    if (measured := document.get("measured")) is not None:
        lines += measured_table(measured)
    timing = document["timing"]
    seconds = timing.get("total_s", 0.0)
    lines.append(f"{timing['hvps']} Hessian-vector products in {seconds:.2f} s on {timing['device']}")
    execution = document.get("execution") or {}
    if execution:
        lines.append(describe_execution(execution))
    return "\n".join(lines)


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
    ratio = latency_ratio(measured)
    lines.append(
        f"measured: {measured['metric_name']} {measured['metric']:.2f} % (float {measured['baseline']:.2f} %, "
        f"drop {measured['drop']:.2f} pp), artifact {measured['size_bytes']} B, latency p50 {latency['p50']:.3f} ms"
        f"{', ' + ratio if ratio else ''} (mean {latency['mean']:.3f}, p90 {latency['p90']:.3f}) on {latency['device']}"
    )
    lines += against_lines(measured, document["request"].get("baseline", "fp32"))
    if measured.get("metric_reason"):
        lines.append(f"metric: {measured['metric_name']} because {measured['metric_reason']}")
    lines.append(f"{document['evaluations']} evaluations; wrote {document['artifact']}")
    return "\n".join(lines)


def against_lines(measured: Mapping[str, Any], baseline: str) -> list[str]:
    """One line per baseline model the plan was compared with (``Measurement.against``): the drop,
    the p50 latency ratio and the size ratio; the one ``max_drop`` held against is marked."""
    lines = []
    for name, comparison in (measured.get("against") or {}).items():
        ratio = comparison["latency_ratio"]
        latency = "latency not measured" if ratio is None else f"latency x{ratio:.2f}"
        mark = " (--max-drop against this)" if name == baseline else ""
        lines.append(
            f"against {name}: {comparison['metric']:.2f} % there, drop {comparison['drop']:.2f} pp, "
            f"{latency}, size x{comparison['size_ratio']:.2f}{mark}"
        )
    return lines


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
