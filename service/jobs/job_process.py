"""The sandboxed process that runs one job's computation (``python -m service.jobs.job_process``).

It holds no database URL and no path into the store: the supervisor (``service.jobs.supervisor``)
sends the job's parameters and its input files as open descriptors, and everything the job
produces goes back as frames on the channel (progress, log lines, a sensitivity result to cache,
the final result) plus the bytes of an artifact written to a descriptor the supervisor gave.
The supervisor stores them. What each job type computes is in ``service.jobs.handlers``.
"""

from __future__ import annotations

import errno
import threading
import traceback
from pathlib import Path
from typing import Any

from service.jobs.context import ChildContext
from service.jobs.errors import Cancelled, JobInputError
from service.jobs.handlers import HANDLERS  # the libraries (torch) load inside each handler, not here
from service.sandbox.child import enter_sandbox


def run(context: ChildContext) -> dict[str, Any]:
    """The final frame: ``done`` with the handler's payload, or ``failed`` with a code and a message."""
    try:
        handler = HANDLERS.get(context.job_type)
        if handler is None:
            raise JobInputError(f"unknown job type {context.job_type!r}")
        return {"kind": "done", "result": handler(context)}
    except Cancelled:
        return {"kind": "failed", "code": "cancelled", "message": "cancelled by request"}
    except JobInputError as error:
        return {"kind": "failed", "code": error.code, "message": str(error)}
    except MemoryError:
        return {
            "kind": "failed",
            "code": "resource_limit",
            "message": "the job ran out of its memory budget (MPQ_JOB_MEMORY_BYTES); use a smaller batch_size "
            "or fewer probes per pass, or raise the budget",
        }
    except OSError as error:
        if error.errno != errno.EFBIG:
            raise
        return {
            "kind": "failed",
            "code": "resource_limit",
            "message": "the job wrote a file larger than its limit (MPQ_MAX_DECOMPRESSED_BYTES)",
        }
    except Exception as error:  # the job fails with a reason; the supervisor keeps the traceback in the log
        context.log(traceback.format_exc())
        return {"kind": "failed", "code": "internal", "message": f"internal error: {type(error).__name__}: {error}"}


def main() -> None:
    channel, report = enter_sandbox()
    channel.send({"kind": "sandbox", "report": report.describe()})
    received = channel.receive()
    if received is None:
        return
    job, fds = received
    names: list[str] = job.get("files", [])
    context = ChildContext(channel, job, dict(zip(names, fds)), Path.cwd())
    threading.Thread(target=context.listen, daemon=True, name="channel-reader").start()
    channel.send(run(context))


if __name__ == "__main__":
    main()
