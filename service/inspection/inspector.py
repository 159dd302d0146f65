"""Upload inspections in sandboxed one-shot processes, at most N at once, each bounded in time and memory.

Every inspection (``service.inspection.checks``) runs in its own fresh process that gets the file as a
descriptor, answers once and exits: a hostile upload can hang or exhaust only the process that
reads it, never the API process, and never the next user's inspection. Spare processes are
started ahead by one long-lived thread (their parent-death signal follows the thread that
started them), so a request does not wait for an interpreter to start.

Two kinds. An upload's inspector imports onnx only (~0.3 s of CPU to start) and reads one upload.
A job request's inspector also imports the libraries and torch (~1.5 s) and answers up to
``JOB_REQUESTS_PER_PROCESS`` requests: those read models that already passed an upload's
inspection, and starting torch for each one cost every submission 1.5-2 s of CPU (on its path
without a spare, in the background with one). Any error, crash or timeout retires it at once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from service.inspection.checks import InvalidUpload, Limits
from service.sandbox.channel import ChannelClosed
from service.sandbox.child import Child, SandboxLimits, start_child

logger = logging.getLogger("mpq.inspector")
# A model's description: names and shapes of its layers, inputs and outputs (a real 1,000-layer
# model's is ~200 KB). The API parses it, so it is bounded.
MAX_REPLY_BYTES = 16 << 20
JOB_REQUESTS_PER_PROCESS = 50
REQUESTS_PER_PROCESS = {"upload": 1, "job": JOB_REQUESTS_PER_PROCESS}


class Inspector:
    def __init__(
        self,
        limits: Limits,
        sandbox: SandboxLimits,
        processes: int = 2,
        timeout_s: float = 60.0,
        hide: list[Path] | None = None,
        queue_timeout_s: float = 30.0,
        module: str = "service.inspection.checks",
        env: dict[str, str] | None = None,
    ) -> None:
        self.module = module  # what the sandboxed processes run (tests swap in a double)
        self.env = env
        self.limits = limits
        self.sandbox = sandbox
        self.timeout_s = timeout_s
        self.queue_timeout_s = queue_timeout_s  # how long a request waits for a free inspector before 503
        self.hide = hide or []
        self._slots = threading.BoundedSemaphore(processes)
        self._spares: dict[str, list[Child]] = {"upload": [], "job": []}
        self._answered: dict[int, int] = {}  # pid -> requests answered
        self._wanted = {"upload": processes, "job": 1}
        self._changed = threading.Condition()
        self._closed = False
        self._keeper: threading.Thread | None = None

    # ------------------------------------------------ the three questions

    def model(self, path: Path) -> dict[str, Any]:
        return _fields(self._ask("model", path))

    def dataset(self, path: Path) -> dict[str, Any]:
        return _fields(self._ask("dataset", path))

    def job_request(
        self,
        path: Path,
        model_format: str,
        method: str,
        options: dict[str, Any],
        plan: dict[str, Any] | None = None,
        datasets: dict[str, dict[str, Any]] | None = None,
        sample_axes: dict[str, int | None] | None = None,
    ) -> None:
        """``datasets``: role ("calibration", "evaluation") -> the stored array descriptions."""
        self._ask("job_request", path, [model_format, method, options, plan, datasets or {}, sample_axes or {}])

    # ------------------------------------------------ mechanics

    def _ask(self, function: str, path: Path, args: list[Any] | None = None) -> Any:
        if not self._slots.acquire(timeout=self.queue_timeout_s):
            raise InspectorBusy(f"every upload inspector stayed busy for {self.queue_timeout_s:.0f} s; retry later")
        kind = "job" if function == "job_request" else "upload"
        try:
            child = self._take_spare(kind)
            answered = False
            try:
                with path.open("rb") as file:
                    child.channel.send(
                        {"function": function, "args": args or [], "limits": asdict(self.limits)}, [file.fileno()]
                    )
                reply = child.channel.receive(self.timeout_s)
                answered = reply is not None
            except ChannelClosed:
                reply = (_crash_message(child), [])
            finally:
                self._done_with(child, kind, healthy=answered)
        finally:
            self._slots.release()
        if reply is None:
            raise InvalidUpload(
                f"inspecting the upload took longer than {self.timeout_s:.0f} s "
                "(MPQ_INSPECT_TIME_LIMIT_S); it was stopped"
            )
        message, _fds = reply
        if "value" in message:
            return message["value"]
        raise InvalidUpload(
            str(message.get("invalid", "the upload could not be inspected")),
            code="infeasible" if message.get("code") == "infeasible" else "bad_input",
        )

    def _take_spare(self, kind: str) -> Child:
        with self._changed:
            self._start_keeper()
            while True:
                while not self._spares[kind]:
                    self._changed.wait(self.timeout_s)
                    if self._closed:
                        raise InspectorBusy("the server is shutting down")
                child = self._spares[kind].pop(0)  # the oldest: the newest may still be importing onnx
                self._changed.notify_all()  # the keeper starts a replacement
                if child.process.poll() is None:
                    return child
                self._answered.pop(child.pid, None)  # died waiting (killed, out of memory): never handed out
                self._retire(child)

    def _done_with(self, child: Child, kind: str, healthy: bool) -> None:
        """Back among the spares if it may answer more, else retired."""
        answered = self._answered.pop(child.pid, 0) + 1
        if healthy and answered < REQUESTS_PER_PROCESS[kind] and child.process.poll() is None:
            with self._changed:
                if not self._closed:
                    self._answered[child.pid] = answered
                    self._spares[kind].append(child)
                    self._changed.notify_all()
                    return
        self._retire(child)

    def _retire(self, child: Child) -> None:
        output = child.log_tail(4000).strip()
        if output:
            logger.warning("inspector process %s said:\n%s", child.pid, output)
        child.close()  # one inspection per process: nothing of one upload survives into the next

    def start(self) -> None:
        """Start the spare processes now (else on the first request); also after ``close``."""
        with self._changed:
            self._closed = False
            self._start_keeper()

    def _start_keeper(self) -> None:
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, daemon=True, name="mpq-inspector-spares")
            self._keeper.start()

    def _keep(self) -> None:
        """Keep the wanted spare inspectors of each kind started, from this one thread."""
        while True:
            with self._changed:
                kind = self._short_kind()
                while not self._closed and kind is None:
                    self._changed.wait()
                    kind = self._short_kind()
                if self._closed or kind is None:
                    return
            requests = REQUESTS_PER_PROCESS[kind]
            # CPU time adds up over a process's requests; the wall-clock limit bounds each one
            limits = replace(
                self.sandbox, cpu_time_s=self.sandbox.cpu_time_s * requests, max_frame_bytes=MAX_REPLY_BYTES
            )
            env = {**(self.env or {}), "MPQ_INSPECTOR_KIND": kind, "MPQ_INSPECTOR_REQUESTS": str(requests)}
            try:
                child = start_child(self.module, limits, env=env, hide=self.hide)
            except Exception:
                logger.exception("could not start an upload inspector")
                with self._changed:
                    self._changed.wait(1.0)
                continue
            with self._changed:
                self._spares[kind].append(child)
                self._changed.notify_all()

    def _short_kind(self) -> str | None:
        """The kind with fewer spares than wanted (uploads first), if any."""
        return next((kind for kind, wanted in self._wanted.items() if len(self._spares[kind]) < wanted), None)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            keeper, self._keeper = self._keeper, None
            self._changed.notify_all()
        if keeper is not None:
            keeper.join(timeout=10)
        with self._changed:  # after the keeper: it may have added one while stopping
            spares = [child for children in self._spares.values() for child in children]
            self._spares = {kind: [] for kind in self._spares}
        for child in spares:
            child.close()


def _fields(value: Any) -> dict[str, Any]:
    """An upload's description as the inspector sent it: a JSON object, or the process broke the protocol."""
    if not isinstance(value, dict):
        raise InvalidUpload("the upload could not be inspected (the inspector answered something else)")
    return value


class InspectorBusy(Exception):
    """No inspector became free in time (the API answers 503 with Retry-After)."""


def _crash_message(child: Child) -> dict[str, str]:
    child.kill()
    code = child.process.returncode
    if code is not None and code < 0:
        return {
            "invalid": f"inspecting the upload crashed the inspector (signal {-code}); it is not a valid model "
            "or dataset, or it needs more than the inspector's memory budget (MPQ_INSPECT_MEMORY_BYTES)"
        }
    return {"invalid": "inspecting the upload crashed the inspector; it is not a valid model or dataset"}
