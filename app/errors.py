"""Typed errors: what went wrong decides whether the job fails and whether the worker survives.

InvalidInput   the caller sent something we refuse: the job fails, the worker is fine.
JobFailed      the job could not be done (storage down, out of memory): the job fails, the worker is fine.
WorkerBroken   the worker can no longer serve (poisoned CUDA context, preflight failure): the job
               fails and the platform must replace the worker.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class; `type` is the machine-readable kind reported to the caller."""

    type = "error"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        """The `{"type", "message", "field"?}` body of a JobError."""
        out = {"type": self.type, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class InvalidInput(WorkerError):
    type = "invalid_input"


class JobFailed(WorkerError):
    type = "job_failed"


class JobTimeout(JobFailed):
    type = "timeout"


class OutOfMemory(JobFailed):
    type = "out_of_memory"


class WorkerBroken(WorkerError):
    type = "worker_broken"
