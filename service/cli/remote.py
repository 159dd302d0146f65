"""``mpq sensitivity`` / ``mpq plan`` with ``--server URL``: the same commands, run by a server.

Upload (skipped when the server already has the file), submit with an Idempotency-Key,
wait with progress on stderr, download the artifact to ``--out``; the same JSON document
and exit codes as the local run (0 ok, 2 bad input, 3 no configuration meets the
constraints, 1 anything else).

Nothing here imports a library (torch, onnx, onnxruntime) or the server stack: the light client
install (``pip install mpq``) runs these commands. The options go to the server as the libraries'
keyword arguments (``service.cli.options``), and the server checks them with the libraries at
submission, in the words of the local run (an invalid one: 422, exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from service.cli.client import DEFAULT_OUTAGE_S, ApiError, GaveUp, MpqClient, idempotency_key
from service.cli.options import plan_fields, sample_axes_option, sensitivity_options
from service.cli.output import (
    ExitCode,
    plan_document,
    report_failure,
    report_plan,
    sensitivity_document,
    sensitivity_table,
)
from service.cli.progress import ProgressPrinter, follow_job
from service.job_status import JobStatus


def add_server_options(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group("remote run")
    group.add_argument("--server", metavar="URL", help="run on this mpq server instead of locally")
    group.add_argument("--token", help="API token for --server (default: $MPQ_TOKEN)")
    group.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds in all (uploads, waits, retries); without it, give up "
        f"once the server has been unreachable for {DEFAULT_OUTAGE_S:.0f} s",
    )


def _client(args: argparse.Namespace) -> MpqClient:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    return MpqClient(args.server, args.token or os.environ.get("MPQ_TOKEN"), deadline=deadline, on_retry=_say_retry)


def _say_retry(reason: str, wait_s: float) -> None:
    print(f"mpq: {reason}; retrying in {wait_s:g} s", file=sys.stderr)


def _fail(error: Exception, args: argparse.Namespace) -> int:
    code = error.code if isinstance(error, ApiError) else None
    job_id = error.job_id if isinstance(error, GaveUp) else None
    message = str(error) if job_id is None else f"{error}; {_left_running(job_id, args)}"
    return report_failure(message, _exit_code(error), as_json=args.json, problem=code, job_id=job_id)


def _left_running(job_id: str, args: argparse.Namespace) -> str:
    """What a user can do about the job the client stopped waiting for."""
    return (
        f"the job goes on on the server: run the same command again to wait for it (the request's "
        f"Idempotency-Key finds it), or cancel it with: curl -X POST -H 'authorization: Bearer $MPQ_TOKEN' "
        f"{args.server.rstrip('/')}/v1/jobs/{job_id}/cancel"
    )


def _exit_code(error: Exception) -> int:
    if isinstance(error, ApiError) and error.code == "infeasible":
        return ExitCode.INFEASIBLE
    if isinstance(error, ApiError) and error.status in (400, 401, 403, 404, 413, 415, 422):
        return ExitCode.BAD_INPUT
    if isinstance(error, (FileNotFoundError, ValueError)):
        return ExitCode.BAD_INPUT
    return ExitCode.FAILED


def _run_job(client: MpqClient, route: str, body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    job = _submit(client, route, body)
    print(f"mpq: job {job['id']} on {args.server}", file=sys.stderr)
    _check_sample_axes_kept(client, job, body)
    # the client's deadline (--timeout, set when it was made) bounds the wait as it bounds everything
    try:
        return client.wait(job["id"], on_progress=follow_job(ProgressPrinter(sys.stderr)), poll_s=1.0)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (service/cli/signals.py): say what became of the job
        print(f"mpq: stopped waiting; {_left_running(job['id'], args)}", file=sys.stderr)
        raise


def _submit(client: MpqClient, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """Submit under the request's own Idempotency-Key: a re-run attaches to the job its first run
    started, running or succeeded. A failed or cancelled one is not attached to: the re-run starts a
    new job, under a key derived from the old one (so the run after it attaches to that)."""
    key = idempotency_key(route, body, client.token)
    while (job := client.submit(route, body, idempotency_key=key))["status"] in RESTARTED:
        key = hashlib.sha256(f"{key}:{job['id']}".encode()).hexdigest()
    return job


# Statuses a re-run does not attach to: it would only report the same failure again.
RESTARTED = {JobStatus.FAILED, JobStatus.CANCELLED}


def _check_sample_axes_kept(client: MpqClient, job: dict[str, Any], body: dict[str, Any]) -> None:
    """A server from before sample_axes ignores the field (unknown JSON fields are dropped) and would
    read every input's samples off its declared shapes: its job is cancelled rather than waited for."""
    if body.get("sample_axes") and job.get("params", {}).get("sample_axes") != body["sample_axes"]:
        client.cancel(job["id"])
        raise ValueError(
            "the server ignores --sample-axis (its mpq predates sample_axes; job cancelled): upgrade "
            "it or run this command without --server"
        )


def _job_exit(job: dict[str, Any], args: argparse.Namespace) -> int | None:
    if job["status"] == JobStatus.SUCCEEDED:
        return None
    code: str | None = (job.get("result") or {}).get("error_code")
    exit_code = {"infeasible": ExitCode.INFEASIBLE, "bad_input": ExitCode.BAD_INPUT}.get(code or "", ExitCode.FAILED)
    return report_failure(
        f"the job {job['status']}: {job.get('error') or ''}",
        exit_code,
        as_json=args.json,
        problem=code,
        job_id=job["id"],
    )


Row = dict[str, Any]  # a model or dataset as the API describes it


def _uploads(client: MpqClient, args: argparse.Namespace) -> tuple[Row, Row, Row | None]:
    """The model, the --data set and the --eval-data set (None without one), each uploaded unless the
    server already holds the same file."""
    model = client.upload_model(Path(args.model))
    data = client.upload_dataset(Path(args.data))
    evaluation = getattr(args, "eval_data", None)
    return model, data, client.upload_dataset(Path(evaluation)) if evaluation else None


def remote_sensitivity(args: argparse.Namespace) -> int:
    try:
        options = sensitivity_options(args)
        sample_axes = sample_axes_option(args.sample_axis)
        with _client(args) as client:
            model, data, _ = _uploads(client, args)
            body = {"model_id": model["id"], "dataset_id": data["id"], "method": args.method, "options": options}
            job = _run_job(client, "/v1/sensitivity", {**body, "sample_axes": sample_axes}, args)
            if (code := _job_exit(job, args)) is not None:
                return code
            stored = client.get(f"/v1/sensitivity/{job['result']['sensitivity_result_id']}")
    except (ApiError, OSError, ValueError) as error:
        return _fail(error, args)
    document = sensitivity_document(args.method, stored["result"])
    print(json.dumps(document, allow_nan=False) if args.json else sensitivity_table(document))
    return ExitCode.OK


def remote_plan(args: argparse.Namespace) -> int:
    try:
        fields = plan_fields(args)
        with _client(args) as client:
            model, calibration, evaluation = _uploads(client, args)
            body = {
                "model_id": model["id"],
                "calibration_dataset_id": calibration["id"],
                "evaluation_dataset_id": evaluation["id"] if evaluation else None,
                **{name: fields[name] for name in ("method", "search", "metric", "baseline", "objective")},
                "candidates": list(fields["candidates"]),
                "constraints": {name: fields[name] for name in CONSTRAINTS if fields[name] is not None},
                "exclude": list(fields["exclude"]),
                "options": {"seed": fields["seed"], **fields["sensitivity_options"]},
                "sample_axes": fields["sample_axes"],
            }
            job = _run_job(client, "/v1/plans", body, args)
            if (code := _job_exit(job, args)) is not None:
                return code
            plan_id = job["result"]["plan_id"]
            plan = client.get(f"/v1/plans/{plan_id}")
            sha256 = client.download_artifact(plan_id, Path(args.out))
    except (ApiError, OSError, ValueError) as error:
        return _fail(error, args)
    document = plan_document(plan["result"], artifact=args.out, artifact_sha256=sha256, plan_id=plan_id)
    return report_plan(document, as_json=args.json)


# The plan request's constraints (planner.PlanRequest.constraints(): its budgets and max_drop).
CONSTRAINTS = ("max_size_bytes", "max_bops", "max_latency_ms", "max_drop")
