"""Run one job: claim it, start its sandboxed process, relay what it says, store what it made.

The supervisor is the only side of a job that talks to the database and the blob store. The job
process (``service.jobs.job_process``) gets its inputs as open descriptors and sends frames back;
everything it sends is checked here, since it may have been taken over by the file it opened.

    claim -> prepare (rows, blobs) -> start child -> [progress, log, sensitivity cache] -> done | failed
          -> store (artifact blob, rows) -> finish

The supervisor also enforces what the child cannot be trusted to: the heartbeat, the cancel
(flag, then SIGTERM, then SIGKILL), the wall-clock time limit and a server shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from service.job_status import JobStatus
from service.jobs.errors import JobInputError
from service.jobs.job_types import JOB_TYPES, Finished, JobInputs, JobType, save_rows
from service.sandbox.channel import ChannelClosed
from service.sandbox.child import Child, SandboxLimits, start_child
from service.settings import Settings
from service.store.blobs import LocalBlobStore
from service.store.sql_store import SqlStore
from service.store.tables import Job, LatencyTableRow, SensitivityResultRow

logger = logging.getLogger("mpq.supervisor")
LOG_TAIL_LINES = 200
MAX_LOG_LINE = 4000
PROGRESS_WRITE_INTERVAL_S = 0.5
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Column widths of latency_tables (service/store/tables.py): a longer value from the child is malformed.
_LATENCY_KEY_LENGTHS = {"device_description": 300, "provider": 64, "onnxruntime_version": 64}
_MAX_CANDIDATES_TEXT = 200
_FAILURE_CODES = {"bad_input", "infeasible", "resource_limit", "internal"}


def job_limits(settings: Settings) -> SandboxLimits:
    """A job's sandbox: its memory budget, CPU time for every core over the wall-clock limit, and
    files no larger than the largest unpacked upload (a bundle's external data, an fp32 artifact)."""
    cores = os.cpu_count() or 1
    return SandboxLimits(
        memory_bytes=settings.job_memory_bytes,
        cpu_time_s=int(settings.job_time_limit_s * cores) + 60,
        file_size_bytes=settings.max_decompressed_bytes + (64 << 20),
        user=settings.sandbox_user,
    )


def hidden_paths(settings: Settings) -> list[Path]:
    """What a sandboxed child must not see: the blob store and the SQLite database's directory."""
    paths = [settings.resolved_artifact_dir]
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        paths.append(Path(url.removeprefix("sqlite:///")).parent)
    return paths


def supervise(
    job_id: str,
    settings: Settings,
    db: SqlStore,
    env: dict[str, str] | None = None,
    poll_s: float = 0.2,
    shutdown: threading.Event | None = None,
) -> str:
    """Run one job to a finished (or requeued) state; returns that state ('skipped' if not claimable).

    When ``shutdown`` is set the child is stopped at once and its job requeued without counting
    the attempt (the server is going away; the job did nothing wrong).
    """
    # The child starts first (it waits for its job) so that the job's worker id names it from the
    # claim on: an operator's (or a test's) ``kill`` of the last pid lands on the job, never on the
    # server. The id names the supervising process too, which is the one reapers watch: it stores
    # the result after the child has exited, and watching the child requeued finished jobs.
    child = start_child("service.jobs.job_process", job_limits(settings), env, hide=hidden_paths(settings))
    try:
        worker = f"{socket.gethostname()}:{os.getpid()}:{child.pid}"
        job = db.claim_job(job_id, worker)
        if job is None:
            return "skipped"
        run = JobRun(job, settings, db, worker, child, shutdown or threading.Event(), poll_s)
        try:
            return run.execute()
        except Exception as error:  # a bug here must not leave the job running forever
            logger.exception("supervising job %s failed", job_id)
            return run.end(JobStatus.FAILED, f"internal error: {type(error).__name__}: {error}")
    finally:
        child.close()


class JobRun:
    """The supervisor's state for one claimed job."""

    def __init__(
        self,
        job: Job,
        settings: Settings,
        db: SqlStore,
        worker: str,
        child: Child,
        shutdown: threading.Event,
        poll_s: float,
    ) -> None:
        self.child = child
        self.job_id, self.job_type, self.params, self.owner = job.id, job.type, dict(job.params), job.owner
        self.settings, self.db, self.worker = settings, db, worker
        self.shutdown, self.poll_s = shutdown, poll_s
        self.store = LocalBlobStore(settings.resolved_artifact_dir)
        self.log_lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.inputs: JobInputs | None = None
        self.sensitivity_result_id: str | None = None
        self.final: dict[str, Any] | None = None
        self._progress_written = ("", 0.0)

    # ------------------------------------------------ the run

    def execute(self) -> str:
        job_type = JOB_TYPES.get(self.job_type)
        if job_type is None:
            return self.end(JobStatus.FAILED, f"unknown job type {self.job_type!r}", code="bad_input")
        try:
            self.inputs = job_type.prepare(self.db, self.params)
        except JobInputError as error:
            return self.end(JobStatus.FAILED, str(error), code=error.code)
        self.inputs.owner = self.owner
        with ExitStack() as stack:
            try:
                files: dict[str, IO[bytes]] = {
                    role: stack.enter_context(self.store.local_path(sha256).open("rb"))
                    for role, sha256 in self.inputs.blobs.items()
                }
            except FileNotFoundError:  # a server fault; the path stays in the server's log
                logger.exception("job %s: a stored file is missing", self.job_id)
                return self.end(
                    JobStatus.FAILED,
                    "internal error: a stored input file of this job is missing from the artifact store",
                    code="internal",
                )
            artifact = (
                stack.enter_context(tempfile.TemporaryFile(dir=self.store.temp_dir)) if self.inputs.artifact else None
            )
            if artifact is not None:
                files["artifact"] = artifact
            started = time.monotonic()
            self.child.channel.send(
                {
                    "type": self.job_type,
                    "params": self.params,
                    "files": list(files),
                    "model": {
                        "name": self.inputs.model_name,
                        "format": self.inputs.model_format,
                        "sample_axes": self.inputs.sample_axes,
                    },
                },
                [f.fileno() for f in files.values()],
            )
            stopped = self._relay(started)
            if stopped is not None:
                return stopped
            return self._conclude(job_type, artifact)

    def _relay(self, started: float) -> str | None:
        """Pass frames until the child ends; returns a final status if the supervisor ended the job."""
        child = self.child
        cancel_seen = terminated = None
        next_beat = 0.0
        while True:
            if self.shutdown.is_set():
                child.kill()
                return self._requeue_after_shutdown()
            try:
                received = child.channel.receive(self.poll_s)
            except ChannelClosed:
                self._await_exit(child)
                return None
            if received is not None:
                self._handle(child, *received)
            elif child.process.poll() is not None:
                return None
            now = time.monotonic()
            if now - started > self.settings.job_time_limit_s:
                child.kill()
                return self.end(
                    JobStatus.FAILED,
                    f"time limit: the job ran longer than {self.settings.job_time_limit_s:g} s (MPQ_JOB_TIME_LIMIT_S)",
                    code="time_limit",
                )
            if now < next_beat:
                continue
            next_beat = now + min(1.0, self.settings.heartbeat_interval_s)
            if self._beat() and cancel_seen is None:
                cancel_seen = now
                self._send_cancel(child)
            if cancel_seen is not None and terminated is None and now - cancel_seen > self.settings.cancel_grace_s:
                logger.info("job %s ignored its cancel: SIGTERM", self.job_id)
                child.process.send_signal(signal.SIGTERM)
                terminated = now
            elif terminated is not None and now - terminated > self.settings.cancel_grace_s:
                logger.info("job %s survived SIGTERM: SIGKILL", self.job_id)
                child.kill()

    def _await_exit(self, child: Child, grace_s: float = 5.0) -> None:
        """The channel closed: the child is ending. One that lingers has broken the protocol."""
        try:
            child.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.log("the job process closed its channel but did not exit; stopping it")
            child.kill()

    def _conclude(self, job_type: JobType, artifact: IO[bytes] | None) -> str:
        final = self.final
        if final is None:
            return self._died(self.child)
        if final["kind"] == "failed":
            code = final.get("code")
            if code == "cancelled":
                return self.end(JobStatus.CANCELLED, "cancelled by request")
            return self.end(
                JobStatus.FAILED,
                str(final.get("message", ""))[:2000],
                code=code if code in _FAILURE_CODES else "internal",
            )
        assert self.inputs is not None
        done = Finished(
            self.job_id, self.params, self.inputs, self.db, self.store, self.sensitivity_result_id, artifact
        )
        try:
            result = job_type.store(done, final.get("result") or {})
        except JobInputError as error:
            return self.end(JobStatus.FAILED, str(error), code=error.code)
        except (KeyError, TypeError, ValueError) as error:
            self.log(f"malformed result: {type(error).__name__}: {error}")
            return self.end(
                JobStatus.FAILED, "internal error: the job process returned a malformed result", code="internal"
            )
        return self.end(JobStatus.SUCCEEDED, None, result=result)

    def _died(self, child: Child) -> str:
        """The child ended without a final frame: cancelled, killed by a limit, or crashed."""
        exitcode = child.process.returncode
        tail = child.log_tail(2000).strip()
        if tail:
            self.log(f"job process output:\n{tail}")
        if self._cancel_requested():
            return self.end(JobStatus.CANCELLED, "cancelled by request (the job was stopped)")
        if exitcode == -signal.SIGXCPU:  # the kernel's signal at RLIMIT_CPU
            return self.end(JobStatus.FAILED, "time limit: the job used up its CPU time", code="time_limit")
        reason = f"the worker process died (exit code {exitcode})"
        job = self.db.get(Job, self.job_id)
        if job is None:
            return "missing"
        return self.db.requeue_or_fail(job, reason, self.settings.max_attempts)

    # ------------------------------------------------ frames from the child

    def _handle(self, child: Child, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:  # the child has no business sending descriptors
            os.close(fd)
        kind = message.get("kind")
        if kind == "progress":
            self._progress(str(message.get("phase", ""))[:64], message.get("fraction"), str(message.get("message", "")))
        elif kind == "log":
            self.log(str(message.get("line", "")))
        elif kind == "sandbox":
            self.log(str(message.get("report", "")))
        elif kind == "lookup_sensitivity":
            child.channel.send({"kind": "sensitivity", "result": self._lookup_sensitivity(message)})
        elif kind == "save_sensitivity":
            self._save_sensitivity(message)
        elif kind == "lookup_latency_table":
            child.channel.send({"kind": "latency_table", "result": self._lookup_latency_table(message.get("key"))})
        elif kind == "save_latency_table":
            self._save_latency_table(message.get("table"))
        elif kind in ("done", "failed") and self.final is None:
            self.final = message
        else:
            self.log(f"ignored an unexpected frame from the job process: {str(kind)[:40]!r}")

    def _progress(self, phase: str, fraction: Any, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0) if isinstance(fraction, (int, float)) else 0.0
        self.log(f"[{phase}] {fraction:.0%} {message}".rstrip())
        now = time.monotonic()
        last_phase, last_time = self._progress_written
        if phase == last_phase and now - last_time < PROGRESS_WRITE_INTERVAL_S:
            return
        self._progress_written = (phase, now)
        self.db.report_progress(self.job_id, phase, fraction, message)

    def _cache_key(self, message: dict[str, Any]) -> tuple[str, str] | None:
        """(method, params hash) of a cache frame, if well formed; the model and data are the job's own."""
        method, key = message.get("method"), message.get("params_hash")
        if (
            method in ("hawq_v2", "hawq_v1", "interlayer", "fisher", "measured")
            and isinstance(key, str)
            and _SHA256.fullmatch(key)
        ):
            return method, key
        return None

    def _lookup_sensitivity(self, message: dict[str, Any]) -> dict[str, Any] | None:
        cache_key = self._cache_key(message)
        if cache_key is None or self.inputs is None:
            return None
        method, key = cache_key
        row = self.db.find_sensitivity(self.inputs.blobs["model"], self.inputs.blobs["calibration"], method, key)
        if row is None:
            return None
        self.sensitivity_result_id = row.id
        self.log(f"reusing sensitivity result {row.id}")
        return row.result

    def _save_sensitivity(self, message: dict[str, Any]) -> None:
        cache_key, result = self._cache_key(message), message.get("result")
        if cache_key is None or not isinstance(result, dict) or self.inputs is None:
            self.log("ignored a malformed sensitivity result from the job process")
            return
        versions = result.get("versions")
        row = SensitivityResultRow(
            job_id=self.job_id,
            model_sha256=self.inputs.blobs["model"],
            dataset_sha256=self.inputs.blobs["calibration"],
            method=cache_key[0],
            params_hash=cache_key[1],
            result=result,
            versions=versions if isinstance(versions, dict) else {},
        )
        save_rows(self.db, row)
        self.sensitivity_result_id = row.id

    def _lookup_latency_table(self, key: Any) -> dict[str, Any] | None:
        fields = _latency_table_key(key)
        if fields is None or self.inputs is None:
            return None
        row = self.db.find_latency_table(self.inputs.blobs["model"], **fields)
        if row is None:
            return None
        self.log(
            f"reusing latency table {row.id} ({fields['device_description']}, onnxruntime {fields['onnxruntime_version']})"
        )
        return row.table

    def _save_latency_table(self, table: Any) -> None:
        fields = _latency_table_key(table)
        if fields is None or not isinstance(table, dict) or self.inputs is None:
            self.log("ignored a malformed latency table from the job process")
            return
        save_rows(
            self.db, LatencyTableRow(job_id=self.job_id, model_sha256=self.inputs.blobs["model"], table=table, **fields)
        )

    # ------------------------------------------------ the job row

    def log(self, line: str) -> None:
        self.log_lines.append(line[:MAX_LOG_LINE])

    def _beat(self) -> bool:
        """Keep heartbeat_at and the log tail fresh; returns whether a cancel was requested."""
        try:
            return self.db.heartbeat(self.job_id, self._log_tail(), deadline_s=5.0)
        except Exception:  # the database is away for a moment: beat again next time
            logger.exception("heartbeat failed for job %s", self.job_id)
            return False

    def _send_cancel(self, child: Child) -> None:
        with contextlib.suppress(ChannelClosed):  # the child is ending anyway
            child.channel.send({"kind": "cancel"})

    def _cancel_requested(self) -> bool:
        return self.db.cancel_requested(self.job_id)

    def _log_tail(self) -> str:
        return "\n".join(self.log_lines)[-20000:]

    def end(
        self, status: JobStatus, error: str | None, *, code: str | None = None, result: dict[str, Any] | None = None
    ) -> str:
        if code is not None:
            result = {**(result or {}), "error_code": code}
        self.db.finish_job(
            self.job_id,
            status,
            error=error,
            result=result,
            log_tail=self._log_tail(),
            only_worker=self.worker,
        )
        return status

    def _requeue_after_shutdown(self) -> str:
        status = self.db.requeue_after_shutdown(self.job_id, self.worker)
        return "missing" if status is None else status


def _latency_table_key(data: Any) -> dict[str, Any] | None:
    """The columns a latency table is looked up by, from a key or a table the child sent
    (``planner.latency_table.LatencyTable.key``'s fields), if well formed; the model is the job's own."""
    if not isinstance(data, dict):
        return None
    texts = {name: data.get(name) for name in _LATENCY_KEY_LENGTHS}
    if not all(isinstance(v, str) and 0 < len(v) <= _LATENCY_KEY_LENGTHS[k] for k, v in texts.items()):
        return None
    batch_size, candidates = data.get("batch_size"), data.get("candidates")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        return None
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
        return None
    joined = ",".join(candidates)
    if not 0 < len(joined) <= _MAX_CANDIDATES_TEXT:
        return None
    return {**texts, "batch_size": batch_size, "candidates": joined}
