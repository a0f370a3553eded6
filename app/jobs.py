"""The job API's wire format, shared by the backend client (app/client.py) and the HTTP API that
fronts Modal (app/jobs_api.py). It is RunPod's, so a backend treats both platforms alike:

    POST /run            {"input": {...}, "webhook"?: url}  -> {"id", "status": "IN_QUEUE"}
    GET  /status/{id}    -> {"id", "status", "output"? , "error"?}
    POST /cancel/{id}    -> {"id", "status"}

`status` is one of IN_QUEUE, IN_PROGRESS, COMPLETED (with `output`), FAILED (with `error`),
CANCELLED and TIMED_OUT (RunPod's execution timeout). Light on purpose: pydantic and httpx only,
so a backend can import the client without torch, FastAPI or a platform SDK.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from loguru import logger
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from app.logs import strip_query

JobState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]
FINAL_STATES: frozenset[str] = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})


class RunRequest(BaseModel):
    """The body of `POST /run`."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any]
    webhook: str | None = Field(None, max_length=2048, pattern=r"^https?://")


class StatusBody(BaseModel):
    """Where a job stands: the body of `/run`, `/status/{id}` and `/cancel/{id}` answers and of a webhook
    call (`status` on the wire), and what the client returns (`app.client.JobStatus`, read as `.state`).
    `output` is set when COMPLETED, `error` when FAILED."""

    id: str
    status: JobState = Field(validation_alias=AliasChoices("status", "state"))
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def state(self) -> JobState:
        """The same value as `status`, under the name the client's callers use."""
        return self.status

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES


def from_result(job_id: str, result: dict) -> StatusBody:
    """A finished `Service.run` result as a status: `{"error": ...}` is FAILED, anything else COMPLETED."""
    if "error" in result:
        return StatusBody(id=job_id, status="FAILED", error=normalize_error(result["error"]))
    return StatusBody(id=job_id, status="COMPLETED", output=result)


def normalize_error(error: Any) -> dict[str, Any]:
    """Any platform's error value as `{"type", "message", ...}`.

    Our worker reports `{"type", "message", "field"?}`. RunPod may hand back a string instead, and for
    an exception that escaped a handler its SDK sends a JSON string holding the traceback: the
    traceback is dropped here (it belongs in the worker's log, not in a caller's hands).
    """
    if isinstance(error, dict) and "message" in error:
        return {k: v for k, v in error.items() if k in ("type", "message", "field")} | {
            "type": str(error.get("type") or "job_failed")}
    if isinstance(error, str):
        try:
            parsed = json.loads(error)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "error_message" in parsed:
            return {"type": "worker_exception", "message": str(parsed["error_message"])[:500]}
        if isinstance(parsed, dict) and "message" in parsed:
            return normalize_error(parsed)
        return {"type": "job_failed", "message": error[:500]}
    return {"type": "job_failed", "message": str(error)[:500] if error else "the job failed"}


def post_webhook(url: str, body: StatusBody, timeout_s: float = 10, attempts: int = 3) -> bool:
    """POST a final status to the caller's webhook; retried, bounded, never raises. True if delivered."""
    import time

    import httpx

    payload = body.model_dump(exclude_none=True)
    for attempt in range(1, attempts + 1):
        try:
            r = httpx.post(url, json=payload, timeout=timeout_s)
            if r.status_code < 300:
                return True
            reason = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            reason = type(e).__name__
        logger.warning("webhook {} attempt {}/{} failed: {}", strip_query(url), attempt, attempts, reason)
        if attempt < attempts:
            time.sleep(min(2 ** (attempt - 1), 5))
    return False
