"""A loopback stand-in for RunPod's serverless job queue (RunPod's cloud cannot be reached from tests).

It serves both sides of a RunPod endpoint, as the real SDK and the public API use them:

  worker side (the runpod SDK's worker loop, pointed here through RUNPOD_WEBHOOK_* variables)
    GET  /v2/{ep}/job-take/{worker}?...        next queued job as {"id", "input"}, or 204
    GET  /v2/{ep}/job-stop/{worker}?...        {"jobsToStop": [...]}, or 204
    POST /v2/{ep}/job-done/{worker}/{id}?...   a progress update ({"status": "IN_PROGRESS"}) or the result
    GET  /v2/{ep}/ping/{worker}?...            heartbeat
  public side (what RunPodJobs calls)
    POST /v2/{ep}/run, GET /v2/{ep}/status/{id}, POST /v2/{ep}/cancel/{id}   (Bearer api key)

State transitions follow RunPod's: IN_QUEUE -> IN_PROGRESS -> COMPLETED | FAILED, and CANCELLED
from any state not yet final. A result whose handler returned {"error": ...} ends FAILED.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


class RunPodStandIn:
    def __init__(self, endpoint_id: str, api_key: str, worker_key: str):
        self.endpoint_id, self.api_key, self.worker_key = endpoint_id, api_key, worker_key
        self.lock = threading.Condition()
        self.jobs: dict[str, dict] = {}
        self.queue: deque[str] = deque()
        self.taken: list[str] = []  # ids handed to a worker, in order
        self.progress: dict[str, list] = {}
        self.pings = 0
        self.to_stop: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def worker_env(self, worker_id: str) -> dict[str, str]:
        """The variables RunPod sets in a serverless worker, pointed at this stand-in."""
        base = f"{self.url}/v2/{self.endpoint_id}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=cpu",  # the SDK substitutes $ID
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=cpu",
            "RUNPOD_PING_INTERVAL": "1000",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_AI_API_KEY": self.worker_key,
            "RUNPOD_ENDPOINT_ID": self.endpoint_id,
        }

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------------------------- transitions
    def _run(self, body: dict) -> tuple[int, dict]:
        if not isinstance(body.get("input"), dict):
            return 400, {"error": "input is required"}
        job_id = f"{uuid.uuid4()}-u1"
        with self.lock:
            self.jobs[job_id] = {"id": job_id, "status": "IN_QUEUE", "input": body["input"],
                                 "webhook": body.get("webhook")}
            self.queue.append(job_id)
            self.lock.notify_all()
        return 200, {"id": job_id, "status": "IN_QUEUE"}

    def _public(self, job: dict) -> dict:
        return {k: v for k, v in job.items() if k in ("id", "status", "output", "error")}

    def _take(self, hold_s: float = 1.0) -> dict | None:
        deadline = time.monotonic() + hold_s
        with self.lock:
            while not self.queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.lock.wait(left)
            job_id = self.queue.popleft()
            self.jobs[job_id]["status"] = "IN_PROGRESS"
            self.taken.append(job_id)
            return {"id": job_id, "input": self.jobs[job_id]["input"]}

    def _done(self, job_id: str, body: dict) -> None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job["status"] in FINAL:
                return  # late progress after the result, or a result after a cancel: dropped
            if body.get("status") == "IN_PROGRESS":
                self.progress.setdefault(job_id, []).append(body.get("output"))
                return
            if body.get("error"):
                job.update(status="FAILED", error=body["error"])
            else:
                job.update(status="COMPLETED", output=body.get("output"))

    def _cancel(self, job_id: str) -> dict | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job["status"] == "IN_QUEUE":
                self.queue.remove(job_id)
            if job["status"] == "IN_PROGRESS":
                self.to_stop.append(job_id)
            if job["status"] not in FINAL:
                job["status"] = "CANCELLED"
            return self._public(job)

    # ------------------------------------------------------------------------------------------ HTTP
    def _handler_class(self):
        standin = self
        ep = re.escape(self.endpoint_id)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict | None = None):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    return json.loads(raw or b"{}")
                except ValueError:
                    return {}

            def _public_ok(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {standin.api_key}":
                    self._send(401, {"error": "Unauthorized"})
                    return False
                return True

            def _worker_ok(self) -> bool:
                if self.headers.get("Authorization") != standin.worker_key:
                    self._send(401, {"error": "worker not authorized"})
                    return False
                return True

            def do_GET(self):
                path = urlparse(self.path).path
                if m := re.fullmatch(rf"/v2/{ep}/status/([^/]+)", path):
                    if self._public_ok():
                        with standin.lock:
                            job = standin.jobs.get(m.group(1))
                            self._send(200, standin._public(job)) if job else self._send(404, {"error": "not found"})
                elif re.fullmatch(rf"/v2/{ep}/job-take/[^/]+", path):
                    if self._worker_ok():
                        job = standin._take()
                        self._send(200, job) if job else self._send(204)
                elif re.fullmatch(rf"/v2/{ep}/job-stop/[^/]+", path):
                    if self._worker_ok():
                        time.sleep(0.2)
                        with standin.lock:
                            ids, standin.to_stop[:] = list(standin.to_stop), []
                        self._send(200, {"jobsToStop": ids}) if ids else self._send(204)
                elif re.fullmatch(rf"/v2/{ep}/ping/[^/]+", path):
                    if self._worker_ok():
                        with standin.lock:
                            standin.pings += 1
                        self._send(200, {})
                else:
                    self._send(404, {"error": "no route"})

            def do_POST(self):
                path = urlparse(self.path).path
                if path == f"/v2/{standin.endpoint_id}/run":
                    if self._public_ok():
                        self._send(*standin._run(self._body()))
                elif m := re.fullmatch(rf"/v2/{ep}/cancel/([^/]+)", path):
                    if self._public_ok():
                        out = standin._cancel(m.group(1))
                        self._send(200, out) if out else self._send(404, {"error": "not found"})
                elif m := re.fullmatch(rf"/v2/{ep}/job-done/[^/]+/([^/]+)", path):
                    if self._worker_ok():
                        standin._done(m.group(1), self._body())
                        self._send(200, {})
                else:
                    self._send(404, {"error": "no route"})

        return Handler
