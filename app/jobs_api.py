"""The job HTTP API with RunPod's semantics and routes, over a small `JobBackend` interface.

`create_app(backend, token)` is a FastAPI app serving RunPod's route set twice: at the root
(`POST /run`, `POST /runsync`, `GET|POST /status/{id}`, `POST /cancel/{id}`, `GET /health`) and
under an endpoint-id segment (`/{endpoint_id}/run`, ...; any id is accepted), which is how the
official SDK builds its URLs (`{runpod.endpoint_url_base}/{endpoint_id}/run`): a backend moves
between RunPod and this API by changing one base URL. Every route is behind
`Authorization: Bearer <token>` (401 without it). On Modal the backend is the spawn/`FunctionCall`
one in modal_app.py; `ThreadBackend` here runs jobs in this process (a local server, and the tests).
Nothing here imports Modal or RunPod.

Guards, before anything is queued:
- request bodies are capped as RunPod caps them (10 MB for /run, 20 MB for /runsync): 413, from the
  Content-Length before a byte of the body is read, and while the body streams in when it has none;
- a `webhook` goes through the input images' address guard (app.fetch): a URL that resolves to a
  loopback, private, link-local or metadata address is refused with 422 naming the field, and the
  worker checks it again when it calls it.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from loguru import logger

from app.errors import WorkerError
from app.fetch import FetchLimits, check_url
from app.jobs import WEBHOOK_LIMITS, RunRequest, StatusBody, from_result, post_webhook
from app.limits import MAX_RUN_BODY_BYTES, MAX_RUNSYNC_BODY_BYTES

RUNSYNC_WAIT_S = 90.0  # RunPod's /runsync default; `?wait=` (milliseconds) sets it, up to RUNSYNC_MAX_WAIT_S
RUNSYNC_MAX_WAIT_S = 300.0
ENDPOINT_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class UnknownJob(Exception):
    """No job with that id (never submitted, or its result has expired)."""


class BackendUnavailable(Exception):
    """The platform behind the API could not be reached; the caller may retry."""


class JobBackend(Protocol):
    """Where jobs actually run. Ids are the backend's; states are RunPod's (see app/jobs.py).
    A backend may also have `health() -> {"jobs": {...}, "workers": {...}}` (RunPod's /health)."""

    def submit(self, input: dict[str, Any], webhook: str | None) -> str: ...
    def status(self, job_id: str) -> StatusBody: ...
    def cancel(self, job_id: str) -> StatusBody: ...


class BodyLimit:
    """ASGI middleware: refuse a request body over its route's cap with 413, before the app reads it.

    A Content-Length over the cap is refused at once, the body unread; a body without one (chunked)
    is counted as it arrives and refused as soon as it passes the cap. What is let through is handed
    on whole, so nothing downstream buffers more than the cap.
    """

    def __init__(self, app, run_bytes: int = MAX_RUN_BODY_BYTES, runsync_bytes: int = MAX_RUNSYNC_BODY_BYTES):
        self.app, self.run_bytes, self.runsync_bytes = app, run_bytes, runsync_bytes

    def cap(self, path: str) -> int:
        return self.runsync_bytes if path.rstrip("/").endswith("/runsync") else self.run_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        cap = self.cap(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await _refuse(send, 400, "Content-Length is not a number")
            if int(length) > cap:
                return await _refuse(send, 413, f"request body is {int(length)} bytes, over the {cap} byte "
                                                f"limit of {scope['path']}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return await _refuse(send, 413, f"request body is over the {cap} byte limit of {scope['path']}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(backend: JobBackend, token: str, webhook_limits: FetchLimits = WEBHOOK_LIMITS,
               run_bytes: int = MAX_RUN_BODY_BYTES, runsync_bytes: int = MAX_RUNSYNC_BODY_BYTES) -> FastAPI:
    """The API app. `token` is required (an empty one is refused: the API never runs open).
    `webhook_limits` is the address guard a submitted webhook is checked against (its
    `allow_networks`/`resolver` are the tests' seam; never from the environment)."""
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
    api.add_middleware(BodyLimit, run_bytes=run_bytes, runsync_bytes=runsync_bytes)

    @api.exception_handler(UnknownJob)
    async def _unknown(request: Request, exc: UnknownJob):
        return JSONResponse({"error": "job not found (unknown id, or its result has expired)"}, status_code=404)

    @api.exception_handler(BackendUnavailable)
    async def _unavailable(request: Request, exc: BackendUnavailable):
        return JSONResponse({"error": f"backend unavailable: {exc}"}, status_code=503)

    class RefusedWebhook(Exception):
        def __init__(self, message: str):
            self.message = message

    @api.exception_handler(RefusedWebhook)
    async def _refused(request: Request, exc: RefusedWebhook):
        return JSONResponse({"error": exc.message, "field": "webhook"}, status_code=422)

    def submit(req: RunRequest) -> str:
        if req.webhook is not None:
            try:
                check_url(req.webhook, webhook_limits, field="webhook")  # again when it is called
            except WorkerError as e:
                logger.warning("job refused: {}", e.message)
                raise RefusedWebhook(e.message) from None
        job_id = backend.submit(req.input, req.webhook)
        logger.info("job {} queued", job_id)
        return job_id

    # Sync handlers: FastAPI runs them in its thread pool, so a slow backend call blocks no one else.
    def run(req: RunRequest) -> dict:
        return {"id": submit(req), "status": "IN_QUEUE"}

    def runsync(req: RunRequest, wait: int | None = Query(None, ge=0, description="milliseconds")) -> dict:
        job_id = submit(req)
        deadline = time.monotonic() + min(RUNSYNC_WAIT_S if wait is None else wait / 1000, RUNSYNC_MAX_WAIT_S)
        delay = 0.05
        while True:
            current = backend.status(job_id)
            if current.final or time.monotonic() >= deadline:
                return current.wire()  # not final: RunPod's answer too; the caller polls /status/{id}
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 1.0)

    def status(job_id: str) -> dict:
        return backend.status(job_id).wire()

    def cancel(job_id: str) -> dict:
        out = backend.cancel(job_id)
        logger.info("job {} cancel requested: {}", job_id, out.status)
        return out.wire()

    def health() -> dict:
        report = getattr(backend, "health", None)
        return report() if report else {"jobs": {}, "workers": {}}

    routes: list[tuple[str, Callable, list[str]]] = [
        ("/run", run, ["POST"]), ("/runsync", runsync, ["POST"]),
        ("/status/{job_id}", status, ["GET", "POST"]),  # RunPod's API takes both; its SDK's local server POST
        ("/cancel/{job_id}", cancel, ["POST"]), ("/health", health, ["GET"]),
    ]
    for path, handler, methods in routes:
        api.add_api_route(path, handler, methods=methods)
        api.add_api_route("/{endpoint_id}" + path, _with_endpoint_id(handler), methods=methods)
    return api


def _with_endpoint_id(handler: Callable) -> Callable:
    """`handler` under `/{endpoint_id}/...`: the segment is accepted whatever it names (one API,
    one deployment), checked only for shape."""
    import functools
    import inspect

    @functools.wraps(handler)
    def routed(endpoint_id: str = Path(..., pattern=ENDPOINT_ID), **kw):
        return handler(**kw)

    params = [inspect.Parameter("endpoint_id", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                default=Path(..., pattern=ENDPOINT_ID))]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(handler).parameters.values()]
    routed.__signature__ = inspect.Signature(params, return_annotation=dict)
    return routed


class ThreadBackend:
    """Jobs run in this process on `workers` threads, in submission order; state kept in memory.

    `run(input, job_id)` is `Service.run` (it never raises). A queued job that is cancelled never
    runs; a running one cannot be interrupted, so it finishes and its result is discarded.
    `webhook_limits` is the address guard webhooks are checked against when called.
    """

    def __init__(self, run: Callable[[Any, str], dict], workers: int = 1,
                 webhook_limits: FetchLimits = WEBHOOK_LIMITS):
        self._run = run
        self.workers = workers
        self.webhook_limits = webhook_limits
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
            post_webhook(webhook, final, limits=self.webhook_limits)

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

    def health(self) -> dict:
        """RunPod's /health shape: job counts by state, workers running and idle."""
        with self._lock:
            states = [j.status for j in self._jobs.values()]
        count = {s: states.count(s) for s in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED")}
        running = min(count["IN_PROGRESS"], self.workers)
        return {"jobs": {"inQueue": count["IN_QUEUE"], "inProgress": count["IN_PROGRESS"],
                         "completed": count["COMPLETED"], "failed": count["FAILED"],
                         "cancelled": count["CANCELLED"], "retried": 0},
                "workers": {"running": running, "idle": self.workers - running}}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
