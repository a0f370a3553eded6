"""modal_app.py: imports with no credentials and no GPU; the Worker class runs jobs through `.local()`;
the job API over ModalBackend keeps RunPod's semantics.

Modal's cloud cannot be reached here (no credentials, no network), so in the API tests the two
calls that need it are replaced: `Worker.run.spawn` and `FunctionCall.from_id`. The replacement
"cloud" runs the real Worker through `.local()` and raises Modal's own exceptions (the builtin
TimeoutError while pending, OutputExpiredError, FunctionTimeoutError) exactly where
`FunctionCall.get(timeout=0)` raises them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import httpx
import modal
import pytest
from fastapi.testclient import TestClient

from app.client import ModalJobs, RemoteJobFailed, TransportError
from app.fetch import FetchLimits
from app.jobs_api import create_app
from tests.conftest import AWS_ENV, captured_logs
from tests.helpers_net import receiver

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "modal-api-token-0123456789"


def _import_in_clean_env(extra: dict, code: str, tmp_path) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **extra}  # no ~/.modal.toml, no MODAL_TOKEN_*
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_module_imports_without_credentials_or_gpu(tmp_path):
    out = _import_in_clean_env({}, (
        "import sys, modal_app as m\n"
        "f = m.Worker._get_class_service_function()\n"
        "print(f._spec_.gpus, sorted(f._spec_.volumes), m.DEPLOY.gpu_snapshot, m.DEPLOY.scaledown_s)\n"
        "print(any(k.split('.')[0] in ('torch', 'diffusers') for k in sys.modules))\n"), tmp_path)
    assert out.splitlines() == ["H100 ['/cache', '/weights'] False 60", "False"]


def test_deploy_options_and_worker_env_come_from_the_deploying_shell(tmp_path):
    out = _import_in_clean_env(
        {"GPU": "A100-80GB", "MODAL_GPU_SNAPSHOT": "1", "MODEL": "tiny-sdxl", "AWS_SECRET_ACCESS_KEY": "must-not-pass",
         "MODAL_SECRETS": "s3-creds"},
        "import modal_app as m\nf = m.Worker._get_class_service_function()\n"
        "print(f._spec_.gpus, m.DEPLOY.secrets, sorted(m.worker_env(m.DEPLOY).items()))\n", tmp_path)
    assert out.strip() == ("A100-80GB ['s3-creds'] [('CACHE_DIR', '/cache'), ('HF_HOME', '/weights/hf'), "
                           "('MODAL_GPU_SNAPSHOT', '1'), ('MODEL', 'tiny-sdxl')]")


def test_image_uses_the_dockerfile_when_there_is_one(tmp_path, monkeypatch):
    import modal_app

    reqs = modal_app._pinned_requirements(ROOT)
    assert "torch==2.11.0" in reqs and "diffusers==0.42.1" in reqs and "triton==3.6.0" in reqs
    assert not any(r.startswith("torch>=") for r in reqs)  # gpu.txt's pin replaces pyproject's range
    for name in ("requirements", "app"):
        (tmp_path / name).mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "requirements" / "gpu.txt").write_text("torch==2.11.0\n")
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["torch>=2.11", "boto3>=1.40"]\n')
    # Spies (the real constructors still run): which recipe was chosen, and with what.
    calls = []
    real_dockerfile, real_pip = modal.Image.from_dockerfile, modal.Image.pip_install
    monkeypatch.setattr(modal.Image, "from_dockerfile",
                        staticmethod(lambda *a, **k: calls.append(("dockerfile", a[0])) or real_dockerfile(*a, **k)))
    monkeypatch.setattr(modal.Image, "pip_install",
                        lambda self, *a, **k: calls.append(("pip", a)) or real_pip(self, *a, **k))
    assert isinstance(modal_app.build_image(tmp_path), modal.Image)
    assert calls == [("pip", ("torch==2.11.0",)), ("pip", ("boto3>=1.40", "fastapi>=0.115", "httpx>=0.27"))]
    calls.clear()
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\n")
    assert isinstance(modal_app.build_image(tmp_path), modal.Image)
    assert calls == [("dockerfile", tmp_path / "Dockerfile")]


# ----------------------------------------------------------------------------------- the Worker


@pytest.fixture(scope="module")
def s3_bucket(s3_endpoint):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(AWS_ENV, AWS_ENDPOINT_URL_S3=s3_endpoint).items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="modal-worker")
        yield "modal-worker"


@pytest.fixture(scope="module")
def worker(s3_bucket):
    """The real Worker class, entered through `.local()` with the settings a Modal secret would give."""
    import modal_app

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"MODEL": "tiny-flux", "PREFLIGHT": "0", "DEVICE": "cpu", "WARMUP": "0",
                     "OUTPUT_URI": f"s3://{s3_bucket}/modal"}.items():
            mp.setenv(k, v)
        yield modal_app.Worker()


def test_worker_runs_a_job_through_local(worker):
    out = worker.run.local({"prompt": "a red sneaker on a beach", "seed": 11})
    assert "error" not in out, out
    image = out["images"][0]
    assert image["key"].startswith("modal/local-") and image["seed"] == 11
    body = httpx.get(image["url"], timeout=10).content
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and len(body) == image["bytes"]
    bad = worker.run.local({"prompt": "x", "num_images": 9})
    assert bad["error"]["type"] == "invalid_input" and bad["error"]["field"] == "num_images"
    again = worker.run.local({"prompt": "still healthy", "seed": 1})
    assert "images" in again and "cold_start" not in again  # loaded once: enter ran a single time


def test_worker_checks_the_webhook_again_when_it_calls_it(worker):
    """Worker.run is also callable without the API (`Worker().run.spawn(input, webhook)`): its webhook
    call goes through the address guard itself. A receiver on loopback is never contacted."""
    with captured_logs("WARNING") as lines, receiver() as (port, got):
        # only loopback spellings: a broken guard is then seen by the receiver, never felt elsewhere
        for hook in (f"http://127.0.0.1:{port}/hook", f"http://localhost:{port}/hook",
                     f"http://[::ffff:127.0.0.1]:{port}/hook"):
            out = worker.run.local({"prompt": "a cat", "seed": 3, "num_inference_steps": 1}, hook)
            assert "images" in out, out  # the job itself is unaffected
        assert got == [] and sum("not called" in line for line in lines) == 3, lines


# ------------------------------------------------------------------------------ API over Modal


class FakeCall:
    """A FunctionCall as `FunctionCall.from_id` returns it; its outcome is scripted by the test."""

    def __init__(self, cloud, call_id):
        self.cloud, self.object_id = cloud, call_id
        self.cancelled = False

    def get(self, timeout=None):
        assert timeout == 0
        outcome = self.cloud.outcomes[self.object_id]
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "run":  # executes now, on the real Worker, and keeps its result like Modal does
            self.cloud.outcomes[self.object_id] = outcome = self.cloud.worker.run.local(*self.cloud.inputs[self.object_id])
        return outcome

    def cancel(self):
        self.cloud.cancelled.append(self.object_id)


class FakeCloud:
    def __init__(self, worker):
        self.worker, self.inputs, self.outcomes, self.cancelled, self.marks = worker, {}, {}, [], {}

    def spawn(self, input, webhook=None):
        call = FakeCall(self, f"fc-{len(self.inputs) + 1:04d}")
        self.inputs[call.object_id] = (input, webhook)
        self.outcomes[call.object_id] = TimeoutError()  # pending: get(timeout=0) raises the builtin
        return call

    def from_id(self, call_id):
        return FakeCall(self, call_id)


@pytest.fixture
def cloud_api(worker):
    from modal_app import ModalBackend

    cloud = FakeCloud(worker)
    backend = ModalBackend(spawn=cloud.spawn, marks=cloud.marks, from_id=cloud.from_id)
    # DNS cannot be reached here: the webhook guard's resolver seam answers a public address.
    public = FetchLimits(resolver=lambda host, port: ["93.184.216.34"])
    with TestClient(create_app(backend, TOKEN, webhook_limits=public)) as http:
        yield cloud, ModalJobs("http://testserver", TOKEN, http=http), http


def test_api_states_queue_progress_completed(cloud_api):
    cloud, jobs, _ = cloud_api
    job_id = jobs.submit({"prompt": "a cat", "seed": 4}, webhook="https://backend.example/hook")
    assert cloud.inputs[job_id] == ({"prompt": "a cat", "seed": 4}, "https://backend.example/hook")
    assert jobs.status(job_id).state == "IN_QUEUE"
    cloud.marks[f"started:{job_id}"] = 1.0  # what Worker.run records when it starts
    assert jobs.status(job_id).state == "IN_PROGRESS"
    cloud.outcomes[job_id] = "run"
    done = jobs.wait(job_id, timeout=60, first_poll_s=0.05)
    assert done.state == "COMPLETED" and done.output["images"][0]["seed"] == 4


def test_api_failed_paths(cloud_api):
    cloud, jobs, _ = cloud_api
    invalid = jobs.submit({"prompt": "x", "width": 100})
    cloud.outcomes[invalid] = "run"
    with pytest.raises(RemoteJobFailed) as e:
        jobs.wait(invalid, timeout=30, first_poll_s=0.05)
    assert e.value.status.error["type"] == "invalid_input"

    crashed = jobs.submit({"prompt": "x"})
    cloud.outcomes[crashed] = RuntimeError("preflight failed: CUDA not visible\nTraceback ...")
    status = jobs.status(crashed)
    assert status.state == "FAILED" and status.error == {
        "type": "worker_failed", "message": "RuntimeError: preflight failed: CUDA not visible"}

    slow = jobs.submit({"prompt": "x"})
    cloud.outcomes[slow] = modal.exception.FunctionTimeoutError("timeout")
    assert jobs.status(slow).state == "TIMED_OUT"

    old = jobs.submit({"prompt": "x"})
    cloud.outcomes[old] = modal.exception.OutputExpiredError()
    with pytest.raises(TransportError) as e:
        jobs.status(old)
    assert e.value.status_code == 404

    for bad_id in ("not-a-call-id", "fc-../../x"):
        with pytest.raises(TransportError) as e:
            jobs.status(bad_id)
        assert e.value.status_code == 404


def test_api_modal_outage_is_503_not_failed(cloud_api):
    cloud, jobs, http = cloud_api
    job_id = jobs.submit({"prompt": "x"})
    cloud.outcomes[job_id] = modal.exception.ConnectionError("control plane unreachable")
    r = http.get(f"/status/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 503


def test_api_cancel(cloud_api):
    cloud, jobs, _ = cloud_api
    queued = jobs.submit({"prompt": "x"})
    assert jobs.cancel(queued).state == "CANCELLED"
    assert cloud.cancelled == [queued]
    assert jobs.status(queued).state == "CANCELLED"
    finished = jobs.submit({"prompt": "a cat", "seed": 1})
    cloud.outcomes[finished] = "run"
    assert jobs.cancel(finished).state == "COMPLETED"  # too late: the result stands
    assert cloud.cancelled == [queued]


def test_api_needs_the_token(cloud_api):
    _, _, http = cloud_api
    assert http.post("/run", json={"input": {"prompt": "x"}}).status_code == 401
    assert http.get("/status/fc-0001", headers={"Authorization": "Bearer nope"}).status_code == 401


# ------------------------------------------------------------------- memory snapshots (snap=True)

def test_snapshot_options_follow_modal_gpu_snapshot(tmp_path):
    """The class is declared with memory snapshots always, and Modal's GPU snapshot option only with
    MODAL_GPU_SNAPSHOT=1 (a spy on `App.cls` records what modal_app passes; the real decorator runs)."""
    out = _import_in_clean_env({}, (
        "import importlib, json, os, modal\n"
        "real, seen = modal.App.cls, []\n"
        "modal.App.cls = lambda self, *a, **k: seen.append({n: k.get(n) for n in ('enable_memory_snapshot', "
        "'experimental_options')}) or real(self, *a, **k)\n"
        "import modal_app\n"
        "os.environ['MODAL_GPU_SNAPSHOT'] = '1'\n"
        "importlib.reload(modal_app)\n"
        "print(json.dumps(seen))\n"), tmp_path)
    assert out.strip() == ('[{"enable_memory_snapshot": true, "experimental_options": null}, '
                           '{"enable_memory_snapshot": true, "experimental_options": {"enable_gpu_snapshot": true}}]')


@pytest.fixture
def gpu_load(monkeypatch, tmp_path, tiny_flux_service):
    """Service.load as on a GPU machine, which this one is not: it records which enter called it (`load`,
    before the snapshot, or `ready`, after restore) and runs the real load on the CPU instead, with the
    shared tiny pipeline as what the loader returns (building one costs seconds)."""
    import inspect

    from app.service import Service

    calls, real = [], Service.load.__func__

    def load(cls, settings, *a, **k):
        calls.append(inspect.stack()[2].function)
        if getattr(load, "fail", None):
            raise load.fail
        return real(cls, settings.model_copy(update={"device": "cpu"}), *a,
                    loader=lambda source, plan, cache_dir: tiny_flux_service.pipe, **k)

    monkeypatch.setattr(Service, "load", classmethod(load))
    for k, v in {"MODEL": "tiny-flux", "PREFLIGHT": "0", "DEVICE": "cuda", "WARMUP": "0",
                 "OUTPUT_URI": str(tmp_path / "out")}.items():
        monkeypatch.setenv(k, v)
    load.calls = calls
    return load


@pytest.mark.parametrize("gpu_snapshot, where", [("1", "load"), ("0", "ready")])
def test_the_load_runs_inside_the_snapshot_only_with_gpu_snapshots(gpu_load, monkeypatch, gpu_snapshot, where):
    """MODAL_GPU_SNAPSHOT=1: the whole load (weights on the GPU, warm-up) runs in `@modal.enter(snap=True)`,
    so a restore brings it back; 0: Modal gives the snapshot phase no GPU, so it runs after restore
    (`snap=False`). Either way once, and the job runs."""
    import modal_app

    monkeypatch.setenv("MODAL_GPU_SNAPSHOT", gpu_snapshot)
    worker = modal_app.Worker()
    out = worker.run.local({"prompt": "a red sneaker on a beach", "seed": 3, "num_inference_steps": 1})
    assert "images" in out, out
    assert gpu_load.calls == [where]


def test_a_load_that_fails_inside_the_snapshot_is_refused_not_retried(gpu_load, monkeypatch):
    from app.errors import WorkerBroken

    import modal_app

    monkeypatch.setenv("MODAL_GPU_SNAPSHOT", "1")
    gpu_load.fail = WorkerBroken("preflight: no CUDA device", field="DEVICE")
    out = modal_app.Worker().run.local({"prompt": "x"})
    assert out["error"]["type"] == "worker_broken" and "no CUDA device" in out["error"]["message"]
    assert gpu_load.calls == ["load"]  # `ready` after restore does not load again
