"""The job HTTP API with RunPod's semantics, over a small `JobBackend` interface.

`create_app(backend, token)` is a FastAPI app: `POST /run`, `GET /status/{id}`, `POST /cancel/{id}`,
each behind `Authorization: Bearer <token>` (401 without it). On Modal the backend is the
spawn/`FunctionCall` one in modal_app.py; `ThreadBackend` here runs jobs in this process (a local
server, and the tests). Nothing here imports Modal or RunPod.
"""

from __future__ import annotations

import hmac
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from loguru import logger

from app.jobs import RunRequest, StatusBody, from_result, post_webhook


class UnknownJob(Exception):
    """No job with that id (never submitted, or its result has expired)."""


class BackendUnavailable(Exception):
    """The platform behind the API could not be reached; the caller may retry."""


class JobBackend(Protocol):
    """Where jobs actually run. Ids are the backend's; states are RunPod's (see app/jobs.py)."""

    def submit(self, input: dict[str, Any], webhook: str | None) -> str: ...
    def status(self, job_id: str) -> StatusBody: ...
    def cancel(self, job_id: str) -> StatusBody: ...


def create_app(backend: JobBackend, token: str) -> FastAPI:
    """The API app. `token` is required (an empty one is refused: the API never runs open)."""
    if not token or len(token) < 16:
        raise ValueError("API_TOKEN must be set to a secret of at least 16 characters")
    expected = token.encode()

    def authorized(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of the token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    api = FastAPI(title="diffusion-worker jobs", dependencies=[Depends(authorized)],
                  docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(UnknownJob)
    async def _unknown(request: Request, exc: UnknownJob):
        return JSONResponse({"error": "job not found (unknown id, or its result has expired)"}, status_code=404)

    @api.exception_handler(BackendUnavailable)
    async def _unavailable(request: Request, exc: BackendUnavailable):
        return JSONResponse({"error": f"backend unavailable: {exc}"}, status_code=503)

    def dump(s: StatusBody) -> dict:
        return s.model_dump(exclude_none=True)

    # Sync handlers: FastAPI runs them in its thread pool, so a slow backend call blocks no one else.
    @api.post("/run")
    def run(req: RunRequest) -> dict:
        job_id = backend.submit(req.input, req.webhook)
        logger.info("job {} queued", job_id)
        return {"id": job_id, "status": "IN_QUEUE"}

    @api.get("/status/{job_id}")
    def status(job_id: str) -> dict:
        return dump(backend.status(job_id))

    @api.post("/cancel/{job_id}")
    def cancel(job_id: str) -> dict:
        out = backend.cancel(job_id)
        logger.info("job {} cancel requested: {}", job_id, out.status)
        return dump(out)

    return api


class ThreadBackend:
    """Jobs run in this process on `workers` threads, in submission order; state kept in memory.

    `run(input, job_id)` is `Service.run` (it never raises). A queued job that is cancelled never
    runs; a running one cannot be interrupted, so it finishes and its result is discarded.
    """

    def __init__(self, run: Callable[[Any, str], dict], workers: int = 1):
        self._run = run
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._lock = threading.Lock()
        self._jobs: dict[str, StatusBody] = {}

    def submit(self, input: dict[str, Any], webhook: str | None) -> str:
        job_id = f"job-{uuid.uuid4().hex}"
        with self._lock:
            self._jobs[job_id] = StatusBody(id=job_id, status="IN_QUEUE")
        self._pool.submit(self._work, job_id, input, webhook)
        return job_id

    def _work(self, job_id: str, input: dict, webhook: str | None) -> None:
        with self._lock:
            if self._jobs[job_id].status == "CANCELLED":
                return
            self._jobs[job_id] = StatusBody(id=job_id, status="IN_PROGRESS")
        result = self._run(input, job_id)
        with self._lock:
            if self._jobs[job_id].status == "CANCELLED":
                return
            final = self._jobs[job_id] = from_result(job_id, result)
        if webhook:
            post_webhook(webhook, final)

    def status(self, job_id: str) -> StatusBody:
        with self._lock:
            if job_id not in self._jobs:
                raise UnknownJob(job_id)
            return self._jobs[job_id]

    def cancel(self, job_id: str) -> StatusBody:
        with self._lock:
            current = self._jobs.get(job_id)
            if current is None:
                raise UnknownJob(job_id)
            if not current.final:
                current = self._jobs[job_id] = StatusBody(id=job_id, status="CANCELLED")
            return current

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
