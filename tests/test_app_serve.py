"""`python -m app serve`: the jobs API over a local worker, in a subprocess on a loopback port. The
project's client and the official `runpod.Endpoint` (its base URL changed, nothing else) both use it;
without API_TOKEN it refuses to start rather than serve an open API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import runpod

from app.client import ModalJobs
from tests.conftest import free_port
from tests.helpers_net import stop, wait_for

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "serve-api-token-0123456789"


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "OUTPUT_", "API_TOKEN", "SHAPES"))}
    return env | {"MODEL": "tiny-flux", "DEVICE": "cpu", "PREFLIGHT": "0", "WARMUP": "0",
                  "OUTPUT_URI": str(tmp_path / "out"), **extra}


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port)], cwd=ROOT,
                            env=_env(tmp, API_TOKEN=TOKEN), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _up(base) or proc.poll() is not None, 120, every=0.3) and proc.poll() is None
        yield base, tmp / "out"
    finally:
        stop(proc)


def test_the_client_runs_a_job_on_the_local_api(api):
    base, out = api
    jobs = ModalJobs(base, TOKEN)
    done = jobs.wait(jobs.submit({"prompt": "a cat", "seed": 4, "num_inference_steps": 1}), timeout=60,
                     first_poll_s=0.1)
    (image,) = done.output["images"]
    assert image["seed"] == 4 and (out / image["key"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runpod_endpoint_works_with_a_changed_base_url(api, monkeypatch):
    base, _ = api
    monkeypatch.setattr(runpod, "api_key", TOKEN)
    monkeypatch.setattr(runpod, "endpoint_url_base", base)
    result = runpod.Endpoint("any-id").run_sync({"prompt": "a dog", "seed": 5, "num_inference_steps": 1}, timeout=60)
    assert result["images"][0]["seed"] == 5


def test_serve_without_a_token_refuses_to_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "app", "serve", "--port", str(free_port())], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "API_TOKEN" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # refused before the worker was loaded
