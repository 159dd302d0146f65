"""How a job ends other than by succeeding, as raised inside it (its state transitions are the store's:
``service.store.sql_store.SqlStore``)."""

from __future__ import annotations


class Cancelled(Exception):
    """Raised inside a job when a cancel was requested; the job ends ``cancelled``."""


class JobInputError(Exception):
    """The job's inputs are wrong (the user's problem, not ours): the message is shown as is.

    ``code`` goes into the job's result (``error_code``) for clients: "bad_input", or
    "infeasible" when no configuration meets the constraints.
    """

    def __init__(self, message: str, code: str = "bad_input") -> None:
        super().__init__(message)
        self.code = code
