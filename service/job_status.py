"""A job's status, the one vocabulary of the store, the executors, the API, the dashboard and the CLI client.

    queued -> running -> succeeded | failed | cancelled

A ``StrEnum``: each member is the very string stored in ``jobs.status`` and sent over the API.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
"""The statuses a job never leaves."""
