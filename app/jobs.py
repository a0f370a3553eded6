"""The job API's wire format, shared by the backend client (app/client.py) and the HTTP API that
fronts Modal (app/jobs_api.py). It is RunPod's, so a backend treats both platforms alike:

    POST /run            {"input": {...}, "webhook"?: url}  -> {"id", "status": "IN_QUEUE"}
    POST /runsync        the same, answered with the final status when the job ends in time
    GET  /status/{id}    -> {"id", "status", "output"? , "error"?}
    POST /cancel/{id}    -> {"id", "status"}
    GET  /health         -> {"jobs": {...}, "workers": {...}}

`status` is one of IN_QUEUE, IN_PROGRESS, COMPLETED (with `output`), FAILED (with `error`),
CANCELLED and TIMED_OUT (RunPod's execution timeout). On the wire `error` is a string, as RunPod's
contract (and its SDK's local server) requires: our typed error `{"type", "message", "field"?}`
as compact JSON (`error_text`), which `normalize_error` reads back into the dict the client
returns. Light on purpose: pydantic, loguru and the standard library only, so a backend can import
the client without torch, FastAPI or a platform SDK.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from loguru import logger
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from app.errors import InvalidInput, JobFailed
from app.fetch import FetchLimits, describe, post_json
from app.limits import WEBHOOK_ATTEMPTS, WEBHOOK_CONNECT_TIMEOUT_S, WEBHOOK_DEADLINE_S
from app.retry import Backoff, retry

JobState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]
FINAL_STATES: frozenset[str] = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
# A webhook goes through the input images' address guard (app.fetch): resolved and checked when the
# job is submitted and again when it is called, connected to the checked address, no redirects.
WEBHOOK_LIMITS = FetchLimits(connect_timeout_s=WEBHOOK_CONNECT_TIMEOUT_S, read_timeout_s=WEBHOOK_DEADLINE_S,
                             deadline_s=WEBHOOK_DEADLINE_S)
WEBHOOK_BACKOFF = Backoff(attempts=WEBHOOK_ATTEMPTS, base_s=1.0, cap_s=5.0, jitter=False)


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

    def wire(self) -> dict[str, Any]:
        """The body as RunPod's contract has it: `error` as a string (`error_text`)."""
        out = self.model_dump(exclude_none=True)
        if self.error is not None:
            out["error"] = error_text(self.error)
        return out


def error_text(error: dict[str, Any]) -> str:
    """A JobError as the `error` string of RunPod's contract: `{"type", "message", "field"?}` as compact
    JSON. A RunPod backend reads it with `json.loads`; `normalize_error` turns it back into the dict."""
    return json.dumps({k: error[k] for k in ("type", "message", "field") if error.get(k) is not None},
                      ensure_ascii=False)


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


def post_webhook(url: str, body: StatusBody, timeout_s: float | None = None, attempts: int = WEBHOOK_ATTEMPTS,
                 limits: FetchLimits = WEBHOOK_LIMITS, sleep=None) -> bool:
    """POST a final status (RunPod's shape, `StatusBody.wire`) to the caller's webhook; True if delivered.

    Through the address guard, checked again now (the answer at submit time may have changed): a
    refused address is never contacted and never retried. Other failures (timeout, connection,
    non-2xx, a redirect: not followed) are retried (app.retry) `attempts` times, 1 s then 2 s apart.
    Each try ends within `timeout_s` (default `limits.deadline_s`). Never raises.
    """
    import dataclasses
    import time

    if timeout_s is not None:
        limits = dataclasses.replace(limits, deadline_s=timeout_s, read_timeout_s=min(limits.read_timeout_s, timeout_s))
    payload = json.dumps(body.wire()).encode()
    where = describe(url) if isinstance(url, str) else "(not a URL)"

    def once() -> None:
        try:
            status = post_json(url, payload, limits, field="webhook")
        except JobFailed as e:
            raise _Undelivered(e.message) from None
        if not 200 <= status < 300:
            raise _Undelivered(f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else ""))

    def failed(e: BaseException, attempt: int, _wait: float) -> None:
        logger.warning("webhook {} attempt {}/{} failed: {}", where, attempt, attempts, e)

    try:
        retry(once, dataclasses.replace(WEBHOOK_BACKOFF, attempts=attempts), f"webhook {where}",
              sleep=sleep or time.sleep, transient=lambda e: isinstance(e, _Undelivered), on_retry=failed)
    except InvalidInput as e:
        logger.warning("webhook {} not called: {}", where, e.message)
        return False
    except _Undelivered as e:
        failed(e, attempts, 0.0)
        return False
    return True


class _Undelivered(Exception):
    """A webhook try that may succeed if repeated (timeout, connection, non-2xx answer)."""
