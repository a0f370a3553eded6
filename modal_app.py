"""Modal entry: `modal deploy modal_app.py` deploys the GPU worker and its job API.

    Worker   GPU class (GPU, default H100). `@modal.enter(snap=True)` loads the service inside a
             memory snapshot, so a scale-up restores a loaded process instead of importing torch and
             reading weights again; `@modal.method run` runs one job. Scales to zero.
    api      a small CPU web function: RunPod's job API (`POST /run`, `POST /runsync`,
             `GET /status/{id}`, `POST /cancel/{id}`, `GET /health`, at the root and under any
             `/{endpoint_id}/`, so `runpod.Endpoint` works against it) over `Worker.run.spawn` and
             `FunctionCall.from_id(id).get(timeout=0)`, behind a bearer token from a Modal secret.
             A webhook is checked by the address guard when submitted (422) and again when the
             worker calls it (app.jobs.post_webhook).

Deploy-time options come from the deploying shell's environment (read once, here, at import):
GPU, MODAL_APP_NAME, MODAL_GPU_SNAPSHOT, MODAL_SCALEDOWN_S, MODAL_MAX_CONTAINERS, MODAL_TIMEOUT_S,
MODAL_SECRETS, MODAL_API_SECRET; and any worker setting (MODEL, PRECISION, SHAPES, ...) set there is
passed on to the containers. Credentials are never read here: they reach the containers only
through Modal secrets. Importing this module needs no Modal credentials and no GPU.
"""

from __future__ import annotations

import os
import re
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any, Callable

import modal
from pydantic import BaseModel, Field

from app.config import SECRET_VARS, Settings
from app.jobs import StatusBody, from_result, post_webhook

ROOT = Path(__file__).resolve().parent
WEIGHTS_DIR = "/weights"  # Modal Volume: Hugging Face cache and baked/streamed FP8 weights
CACHE_DIR = "/cache"  # Modal Volume: compile caches, keyed by GPU arch, torch version and model


class ModalDeploy(BaseModel):
    """Deployment options of the Modal app (not the worker's Settings: those live in the containers)."""

    app_name: str = "diffusion-worker"
    gpu: str = "H100"
    # GPU memory snapshots (alpha on Modal): the loaded, warmed pipeline is restored straight into
    # GPU memory. Off: only a CPU memory snapshot of the imported libraries (see README for limits).
    gpu_snapshot: bool = False
    scaledown_s: int = Field(60, ge=2, le=3600)  # idle seconds before a container goes: cost vs warm hits
    max_containers: int | None = Field(None, ge=1)
    timeout_s: int = Field(900, ge=10, le=24 * 3600)  # per job, and for the snapshot load
    secrets: list[str] = ["diffusion-worker-s3", "diffusion-worker-hf"]
    api_secret: str = "diffusion-worker-api"

    @classmethod
    def from_env(cls, env=None) -> "ModalDeploy":
        env = os.environ if env is None else env
        names = {"app_name": "MODAL_APP_NAME", "gpu": "GPU", "gpu_snapshot": "MODAL_GPU_SNAPSHOT",
                 "scaledown_s": "MODAL_SCALEDOWN_S", "max_containers": "MODAL_MAX_CONTAINERS",
                 "timeout_s": "MODAL_TIMEOUT_S", "secrets": "MODAL_SECRETS", "api_secret": "MODAL_API_SECRET"}
        raw: dict[str, Any] = {k: env[v] for k, v in names.items() if env.get(v)}
        if "secrets" in raw:
            raw["secrets"] = [s.strip() for s in raw["secrets"].split(",") if s.strip()]
        return cls.model_validate(raw)


def worker_env(deploy: ModalDeploy, env=None) -> dict[str, str]:
    """The containers' environment: worker settings set in the deploying shell (never a credential),
    the volumes' paths, and whether the snapshot holds GPU memory."""
    env = os.environ if env is None else env
    out = {name.upper(): env[name.upper()] for name in Settings.model_fields
           if env.get(name.upper()) and name.upper() not in SECRET_VARS}
    out.setdefault("CACHE_DIR", CACHE_DIR)
    out["HF_HOME"] = f"{WEIGHTS_DIR}/hf"
    out["MODAL_GPU_SNAPSHOT"] = "1" if deploy.gpu_snapshot else "0"
    return out


def _pinned_requirements(root: Path) -> list[str]:
    """pyproject's dependencies, with the exact versions of requirements/gpu.txt where it pins one."""
    pins = {}
    for line in (root / "requirements" / "gpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower()] = line
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        name = re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower()
        out.append(pins.pop(name, dep))
    out += list(pins.values())
    named = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in out}
    return out + [r for r in ("fastapi>=0.115", "httpx>=0.27") if r.split(">")[0] not in named]


def build_image(root: Path = ROOT) -> modal.Image:
    """One image for both platforms: the project's Dockerfile when there is one; until then the same
    pins on Modal's Debian image (torch's CUDA 13.0 build from PyTorch's index)."""
    if (root / "Dockerfile").exists():
        image = modal.Image.from_dockerfile(root / "Dockerfile", context_dir=root)
    else:
        reqs = _pinned_requirements(root)
        torch_pin = next(r for r in reqs if r.startswith("torch=="))
        image = (modal.Image.debian_slim(python_version="3.11")
                 .pip_install(torch_pin, index_url="https://download.pytorch.org/whl/cu130")
                 .pip_install(*[r for r in reqs if r != torch_pin]))
    return image.add_local_python_source(*_local_packages(root))


def _local_packages(root: Path) -> list[str]:
    return [p for p in ("app", "preflight", "weights") if (root / p / "__init__.py").exists()]


DEPLOY = ModalDeploy.from_env()
app = modal.App(DEPLOY.app_name)
gpu_image = build_image()
api_image = (modal.Image.debian_slim(python_version="3.11")
             .pip_install("fastapi>=0.115", "httpx>=0.27", "pydantic>=2.10,<3", "loguru>=0.7.3")
             .add_local_python_source("app"))
weights_volume = modal.Volume.from_name(f"{DEPLOY.app_name}-weights", create_if_missing=True)
cache_volume = modal.Volume.from_name(f"{DEPLOY.app_name}-compile-cache", create_if_missing=True)
# Which jobs have started, and which were cancelled: FunctionCall alone cannot tell IN_QUEUE from
# IN_PROGRESS. Entries idle for 7 days expire, like the calls' outputs.
job_marks = modal.Dict.from_name(f"{DEPLOY.app_name}-jobs", create_if_missing=True)


def _mark(key: str) -> None:
    """Record a job event in the app's Dict (skipped in `.local()` runs: there is no Modal there)."""
    if not modal.is_local():
        job_marks[key] = time.time()


@app.cls(
    image=gpu_image,
    gpu=DEPLOY.gpu,
    secrets=[modal.Secret.from_name(name) for name in DEPLOY.secrets],
    env=worker_env(DEPLOY),
    volumes={WEIGHTS_DIR: weights_volume, CACHE_DIR: cache_volume},
    min_containers=0,  # scale to zero: an idle endpoint costs nothing
    scaledown_window=DEPLOY.scaledown_s,
    max_containers=DEPLOY.max_containers,
    timeout=DEPLOY.timeout_s,
    enable_memory_snapshot=True,
    experimental_options={"enable_gpu_snapshot": True} if DEPLOY.gpu_snapshot else None,
)
class Worker:
    """One GPU container: loaded once (inside the snapshot when it can be), then one job per call."""

    @modal.enter(snap=True)
    def load(self) -> None:
        """Before the snapshot: settings, logging, libraries, and the whole load when the snapshot can
        hold it (GPU snapshots on, or a CPU-only model). Synchronous on purpose: `.local()` skips an
        async enter."""
        from app.config import secret_values
        from app.errors import WorkerBroken
        from app.logs import configure_logging

        self.service, self.broken = None, None
        try:
            self.settings = Settings.from_env()
        except WorkerBroken as e:
            configure_logging("text", "INFO", secret_values())
            self._refuse(e)
            return
        configure_logging(self.settings.log_format, self.settings.log_level, secret_values())
        self.gpu_snapshot = os.environ.get("MODAL_GPU_SNAPSHOT") == "1"
        from app.service import Service  # imports torch and diffusers: the 14-20 s the snapshot saves

        if self.gpu_snapshot or self.settings.device == "cpu":
            self._load(Service)

    def _load(self, service_cls) -> None:
        from app.errors import WorkerBroken

        try:
            self.service = service_cls.load(self.settings)
        except WorkerBroken as e:
            self._refuse(e)

    def _refuse(self, error: Exception) -> None:
        """A worker that cannot start (bad setting, preflight, weights): the one-line message, not the
        traceback Modal prints for an enter that raises; each call then answers the typed error and
        the container stops taking inputs (`run`)."""
        from app.config import secret_values
        from app.logs import report_start_failure

        self.broken = error
        report_start_failure(error, secret_values())

    @modal.enter(snap=False)
    def ready(self) -> None:
        """After restore: without GPU snapshots no GPU is visible before the snapshot, so load here."""
        if self.broken is not None:
            return
        if self.service is None:
            from app.service import Service

            self._load(Service)
            if self.broken is not None:
                return
        elif not modal.is_local() and self.service.cold_start is not None:
            # Loaded before the snapshot: these phases are the snapshot's, not this container's start.
            self.service.cold_start = {**self.service.cold_start, "loaded_before_snapshot": 1.0}
        if not modal.is_local():
            # Keep what the load wrote (downloaded weights, compile-cache entries) for the next container.
            weights_volume.commit()
            cache_volume.commit()

    @modal.method()
    def run(self, input: dict, webhook: str | None = None) -> dict:
        """Run one job; return the JobResult dict or `{"error": ...}` (never raises)."""
        if self.broken is not None:  # did not start: the refusal, and a fresh container next
            if not modal.is_local():
                modal.experimental.stop_fetching_inputs()
            return {"error": self.broken.to_dict()}
        job_id = modal.current_function_call_id() or f"local-{uuid.uuid4().hex}"
        _mark(f"started:{job_id}")
        result = self.service.run(input, job_id)
        if webhook:  # bounded (2 x 5 s at most): a dead webhook must not hold a GPU for long. Through the
            # address guard, checked again now: a name that now resolves inside is never called.
            post_webhook(webhook, from_result(job_id, result), timeout_s=5, attempts=2)
        if self.service.broken and not modal.is_local():
            modal.experimental.stop_fetching_inputs()  # this container goes; Modal starts a fresh one
        return result


class ModalBackend:
    """The job API's backend on Modal: `spawn` to submit, `FunctionCall.from_id(id).get(timeout=0)` to poll.

    `spawn(input, webhook)` returns a FunctionCall; `marks` is the app's Dict of started/cancelled ids.
    """

    _ID = re.compile(r"fc-[A-Za-z0-9]{1,64}")

    def __init__(self, spawn: Callable[..., Any], marks, from_id: Callable[[str], Any] | None = None):
        self.spawn, self.marks = spawn, marks
        self.from_id = from_id or modal.FunctionCall.from_id

    def submit(self, input: dict, webhook: str | None) -> str:
        from app.jobs_api import BackendUnavailable

        try:
            return self.spawn(input, webhook).object_id
        except (modal.exception.ConnectionError, modal.exception.ServiceError, modal.exception.InternalError) as e:
            raise BackendUnavailable(type(e).__name__) from None

    def status(self, job_id: str) -> StatusBody:
        from app.jobs_api import BackendUnavailable, UnknownJob

        if not self._ID.fullmatch(job_id):
            raise UnknownJob(job_id)
        if self.marks.get(f"cancelled:{job_id}") is not None:
            return StatusBody(id=job_id, status="CANCELLED")
        try:
            result = self.from_id(job_id).get(timeout=0)
        except modal.exception.OutputExpiredError:  # results are kept 7 days
            raise UnknownJob(job_id) from None
        except TimeoutError:  # the builtin one: not finished yet
            started = self.marks.get(f"started:{job_id}") is not None
            return StatusBody(id=job_id, status="IN_PROGRESS" if started else "IN_QUEUE")
        except modal.exception.NotFoundError:
            raise UnknownJob(job_id) from None
        except (modal.exception.ConnectionError, modal.exception.ServiceError, modal.exception.InternalError,
                modal.exception.AuthError) as e:
            raise BackendUnavailable(type(e).__name__) from None
        except modal.exception.FunctionTimeoutError:
            return StatusBody(id=job_id, status="TIMED_OUT",
                              error={"type": "timeout", "message": "the job ran past the function's timeout"})
        except Exception as e:  # the call failed remotely: the container crashed, or its load raised
            message = str(e).splitlines()[0][:200] if str(e) else "the worker failed"
            return StatusBody(id=job_id, status="FAILED",
                              error={"type": "worker_failed", "message": f"{type(e).__name__}: {message}"})
        if not isinstance(result, dict):
            return StatusBody(id=job_id, status="FAILED",
                              error={"type": "worker_failed", "message": "the worker returned no result"})
        return from_result(job_id, result)

    def cancel(self, job_id: str) -> StatusBody:
        current = self.status(job_id)
        if current.final:
            return current
        self.from_id(job_id).cancel()
        self.marks[f"cancelled:{job_id}"] = time.time()
        return StatusBody(id=job_id, status="CANCELLED")


@app.function(image=api_image, secrets=[modal.Secret.from_name(DEPLOY.api_secret)],
              min_containers=0, scaledown_window=300)
@modal.concurrent(max_inputs=64)
@modal.asgi_app()
def api():
    """The job API (RunPod's semantics); `API_TOKEN` comes from the `diffusion-worker-api` secret."""
    from app.config import secret_values
    from app.jobs_api import create_app
    from app.logs import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level, secret_values())
    backend = ModalBackend(spawn=Worker().run.spawn, marks=job_marks)
    return create_app(backend, os.environ.get("API_TOKEN", ""))
