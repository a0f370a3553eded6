"""The backend's side: submit a job, keep its id, poll it to the end; RunPod and Modal alike.

    jobs = RunPodJobs("ENDPOINT_ID", api_key)          # or ModalJobs("https://...modal.run", token),
                                                       # or RunPodLocalJobs() for `handler.py --rp_serve_api`
    job_id = jobs.submit({"prompt": "a red sneaker on a beach", "seed": 7})
    status = jobs.wait(job_id, timeout=300)            # JobStatus(status="COMPLETED", output={...}); .state is the same
    url = status.output["images"][0]["url"]

Errors are typed: `RemoteJobFailed` (the job ended FAILED, CANCELLED or TIMED_OUT; `.status` says
how; not app.errors.JobFailed, which a worker raises), `WaitTimeout` (still running when the wait
ran out; the job goes on), `TransportError` (the API could not be reached or refused the request;
`.status_code` when it answered). Credentials travel
in headers only and never appear in an error or a log line: what a server answers (an error body,
a job's error message) is scrubbed before it is shown, so an upstream that reflects the request's
headers does not print the token (app.logs.redact, plus this client's own token).

A job's `error` arrives as RunPod's string (our typed error as JSON, see app/jobs.py) and is
returned parsed: `status.error == {"type", "message", "field"?}`.

CLI (an entrypoint: reads RUNPOD_API_KEY / API_TOKEN from the environment, never from argv):

    python -m app.client --runpod ENDPOINT_ID submit '{"prompt": "..."}' [--wait] [--webhook URL]
    python -m app.client --modal https://you--diffusion-worker-api.modal.run status ID
    python -m app.client --local http://localhost:8000 submit '{"prompt": "..."}' --wait   # --rp_serve_api
    python -m app.client ... wait ID [--timeout 600]
    python -m app.client ... cancel ID
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from abc import ABC, abstractmethod
from typing import Any, Callable
from urllib.parse import quote

import httpx
from loguru import logger

from app.jobs import StatusBody as JobStatus
from app.jobs import normalize_error
from app.logs import redact
from app.retry import Backoff, retry


class ClientError(Exception):
    """Base of the client's errors."""


class TransportError(ClientError):
    """The API could not be reached, or answered with an error (`status_code` set then)."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class RemoteJobFailed(ClientError):
    """The job ended without a result: FAILED (see `.status.error`), CANCELLED or TIMED_OUT."""

    def __init__(self, status: JobStatus):
        err = status.error or {}
        detail = f": {err.get('type', 'error')}: {err.get('message', '')}" if err else ""
        super().__init__(f"job {status.id} ended {status.state}{detail}")
        self.status = status


class WaitTimeout(ClientError):
    """The wait ran out before the job ended; the job itself goes on (cancel it if it is not wanted)."""

    def __init__(self, job_id: str, waited_s: float, last: JobStatus | None):
        super().__init__(f"job {job_id} not finished after {waited_s:.0f} s "
                         f"(last state {last.state if last else 'unknown'})")
        self.job_id, self.last = job_id, last


class Jobs(ABC):
    """One interface over RunPod and Modal: submit, status, wait, cancel."""

    @abstractmethod
    def submit(self, input: dict, webhook: str | None = None) -> str:
        """Queue a job; return its id (store it: it is all you need to poll)."""

    @abstractmethod
    def status(self, job_id: str) -> JobStatus:
        """The job's current state, with its output or error once final."""

    @abstractmethod
    def cancel(self, job_id: str) -> JobStatus:
        """Ask for the job to be cancelled (a queued job never runs; a running one may still finish)."""

    def wait(self, job_id: str, timeout: float = 600, first_poll_s: float = 0.5, max_poll_s: float = 5.0,
             backoff: float = 1.5, sleep: Callable[[float], None] = time.sleep) -> JobStatus:
        """Poll until the job ends, sleeping `first_poll_s` then `backoff` times longer up to `max_poll_s`.

        Returns the COMPLETED status; raises RemoteJobFailed for any other final state and WaitTimeout
        when `timeout` seconds pass first.
        """
        t0 = time.monotonic()
        delay, last = first_poll_s, None
        while True:
            last = self.status(job_id)
            if last.state == "COMPLETED":
                return last
            if last.final:
                raise RemoteJobFailed(last)
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise WaitTimeout(job_id, time.monotonic() - t0, last)
            sleep(min(delay, left))
            delay = min(delay * backoff, max_poll_s)


class _HttpJobs(Jobs):
    """The RunPod-shaped HTTP API, shared by RunPod itself and this project's Modal web API."""

    def __init__(self, base_url: str, token: str, http: httpx.Client | None = None, timeout_s: float = 30,
                 attempts: int = 3):
        if not token:
            raise ValueError(f"{type(self).__name__}: an API key/token is required")
        self.base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {token}"}
        self._token = token
        self.http = http or httpx.Client(timeout=timeout_s)
        self.attempts = attempts
        self._backoff = Backoff(attempts=attempts, base_s=0.5, cap_s=1.0, jitter=False)
        # RunPod's API and ours answer GET /status/{id}; the RunPod SDK's local server only POST (405
        # to a GET): switched on the first 405, then kept.
        self._status_method = "GET"

    def _scrub(self, text: str) -> str:
        """Server-sent text as it may be shown: presigned signatures, bearer tokens, configured
        secrets and this client's own token replaced (before any cut: half a secret is not matched)."""
        return redact(text, also=[self._token])

    def submit(self, input: dict, webhook: str | None = None) -> str:
        body: dict[str, Any] = {"input": input}
        if webhook:
            body["webhook"] = webhook
        # Not retried once sent: a retried POST /run could queue the job twice.
        data = self._call("POST", "/run", body, retry_sent=False)
        if not isinstance(data.get("id"), str):
            raise TransportError("the API's answer to /run has no job id")
        logger.debug("submitted job {}", data["id"])
        return data["id"]

    def status(self, job_id: str) -> JobStatus:
        path = f"/status/{quote(job_id, safe='')}"
        try:
            data = self._call(self._status_method, path)
        except TransportError as e:
            if e.status_code != 405 or self._status_method == "POST":
                raise
            self._status_method = "POST"
            data = self._call("POST", path)
        return self._parse(data, job_id)

    def cancel(self, job_id: str) -> JobStatus:
        return self._parse(self._call("POST", f"/cancel/{quote(job_id, safe='')}"), job_id)

    def _parse(self, data: dict, job_id: str) -> JobStatus:
        error = normalize_error(data["error"]) if data.get("error") else None
        if error is not None:
            error = {k: self._scrub(v) if isinstance(v, str) else v for k, v in error.items()}
        try:
            status = JobStatus(id=data.get("id") or job_id, state=data["status"],
                               output=data.get("output") if isinstance(data.get("output"), dict) else None,
                               error=error)
        except (KeyError, ValueError) as e:
            raise TransportError(f"unexpected status answer for job {job_id}: {type(e).__name__}") from None
        if status.state == "FAILED" and status.error is None:
            status.error = {"type": "job_failed", "message": "the job failed (no error given)"}
        return status

    def _call(self, method: str, path: str, body: dict | None = None, retry_sent: bool = True) -> dict:
        """One API call with bounded retries (app.retry, 0.5 s then 1 s apart): connection failures
        always (nothing was sent), and 429/5xx and read failures only when `retry_sent` (the call is
        idempotent)."""
        url = self.base + path

        def once() -> dict:
            try:
                r = self.http.request(method, url, json=body, headers=self._auth)
            except httpx.ConnectError as e:
                raise _Retryable(f"{method} {url}: cannot connect ({type(e).__name__})", None, True) from None
            except httpx.HTTPError as e:
                raise _Retryable(f"{method} {url}: {type(e).__name__}", None, retry_sent) from None
            if r.status_code == 429 or r.status_code >= 500:
                raise _Retryable(f"{method} {url}: HTTP {r.status_code}: {self._scrub(r.text)[:200]}",
                                 r.status_code, retry_sent)
            return self._answer(method, url, r)

        try:
            return retry(once, self._backoff, f"{method} {path}", transient=lambda e: getattr(e, "again", False))
        except _Retryable as e:
            raise TransportError(str(e), e.status_code) from None

    def _answer(self, method: str, url: str, r: httpx.Response) -> dict:
        """A non-retryable answer as the JSON object it holds, or TransportError."""
        if r.status_code in (401, 403):
            raise TransportError(f"{method} {url}: HTTP {r.status_code}: the API key/token was refused",
                                 r.status_code)
        if r.status_code >= 400:
            raise TransportError(f"{method} {url}: HTTP {r.status_code}: {self._scrub(r.text)[:200]}",
                                 r.status_code)
        try:
            data = r.json()
        except ValueError:
            raise TransportError(f"{method} {url}: the answer is not JSON", r.status_code) from None
        if not isinstance(data, dict):
            raise TransportError(f"{method} {url}: the answer is not a JSON object", r.status_code)
        return data


class _Retryable(TransportError):
    """A failed call, retried when `again` (nothing was sent, or the call is idempotent)."""

    def __init__(self, message: str, status_code: int | None, again: bool):
        super().__init__(message, status_code)
        self.again = again


class RunPodJobs(_HttpJobs):
    """Jobs on a RunPod serverless endpoint (`base_url` is only changed to point at a stand-in)."""

    def __init__(self, endpoint_id: str, api_key: str, base_url: str = "https://api.runpod.ai/v2", **kw):
        if not endpoint_id or "/" in endpoint_id:
            raise ValueError("RunPodJobs: endpoint_id must be the endpoint's id")
        super().__init__(f"{base_url.rstrip('/')}/{endpoint_id}", api_key, **kw)


class ModalJobs(_HttpJobs):
    """Jobs on this project's Modal web API (`modal deploy modal_app.py` prints its URL). The API
    also serves RunPod's paths (`{url}/{any id}/run`...): `RunPodJobs(id, token, base_url=url)` works too."""

    def __init__(self, base_url: str, token: str, **kw):
        super().__init__(base_url, token, **kw)


class RunPodLocalJobs(_HttpJobs):
    """Jobs on the RunPod SDK's local API server (`python handler.py --rp_serve_api`, port 8000).

    That server has no queue: `/run` only records the job, and the job runs inside the first
    `/status/{id}` call, which answers when it is done. Hence the long read timeout, and status
    calls never repeated (a repeated one would run the job again). It checks no token.
    """

    def __init__(self, base_url: str = "http://localhost:8000", token: str = "local-no-auth",
                 timeout_s: float = 900, **kw):
        kw.setdefault("attempts", 1)
        super().__init__(base_url, token, timeout_s=timeout_s, **kw)
        self._status_method = "POST"


# ------------------------------------------------------------------------------------------------ CLI


def _jobs_from_args(args, env) -> Jobs:
    if args.local:
        return RunPodLocalJobs(args.local)
    if args.runpod:
        return RunPodJobs(args.runpod, env.get("RUNPOD_API_KEY", ""))
    if args.modal:
        return ModalJobs(args.modal, env.get("API_TOKEN", ""))
    raise ValueError("say where the jobs run: --runpod ENDPOINT_ID or --modal URL "
                     "(or RUNPOD_ENDPOINT_ID / MODAL_API_URL)")


def main(argv: list[str] | None = None, env: dict | None = None) -> int:
    """`python -m app.client ...`; exit 0 done, 1 job failed, 2 usage, 3 transport error, 4 wait timed out."""
    env = dict(os.environ) if env is None else env
    p = argparse.ArgumentParser(prog="python -m app.client", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--runpod", metavar="ENDPOINT_ID",
                       help="RunPod endpoint id (key from RUNPOD_API_KEY; default RUNPOD_ENDPOINT_ID)")
    where.add_argument("--modal", metavar="URL",
                       help="Modal web API URL (token from API_TOKEN; default MODAL_API_URL)")
    where.add_argument("--local", metavar="URL",
                       help="the RunPod SDK's local server (`python handler.py --rp_serve_api`), e.g. "
                            "http://localhost:8000")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit", help="queue a job, print its id (or its result with --wait)")
    s.add_argument("input", help="the job input as JSON, e.g. '{\"prompt\": \"...\"}'")
    s.add_argument("--webhook")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--timeout", type=float, default=600)
    for name in ("status", "wait", "cancel"):
        c = sub.add_parser(name)
        c.add_argument("id")
        if name == "wait":
            c.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    if not (args.runpod or args.modal or args.local):  # no flag: the environment, RunPod first
        args.runpod = env.get("RUNPOD_ENDPOINT_ID")
        args.modal = None if args.runpod else env.get("MODAL_API_URL")
    try:
        jobs = _jobs_from_args(args, env)
        if args.cmd == "submit":
            job_input = json.loads(args.input)
            job_id = jobs.submit(job_input, args.webhook)
            if not args.wait:
                print(json.dumps({"id": job_id}))
                return 0
            out = jobs.wait(job_id, args.timeout)
        elif args.cmd == "status":
            out = jobs.status(args.id)
        elif args.cmd == "wait":
            out = jobs.wait(args.id, args.timeout)
        else:
            out = jobs.cancel(args.id)
        print(out.model_dump_json(exclude_none=True, indent=2))
        return 0
    except (ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RemoteJobFailed as e:
        print(e.status.model_dump_json(exclude_none=True, indent=2))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TransportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except WaitTimeout as e:
        print(f"error: {e}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
