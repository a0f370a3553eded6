"""Preflight end to end: the library run, `python -m preflight` and handler.py as real subprocesses,
and Service.load stopping before any weight is read. Only what a CPU machine cannot show is set up:
a torch that fails to import is a real package on PYTHONPATH whose import raises, as a wheel without
its cuDNN does; moto enforces signing through its own /moto-api/reset-auth switch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import preflight
from app.config import Settings
from app.errors import WorkerBroken
from preflight.gpu import check_torch
from preflight.runner import cpu_mode


def inputs(settings: Settings):
    """Preflight's plain inputs as the worker builds them from its settings and resolved model source."""
    from app.checks import preflight_inputs
    from app.source import resolve

    return preflight_inputs(settings, resolve(settings.model, settings.revision, settings.hf_offline))
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what a machine without a GPU reports")


def test_cpu_mode_is_decided_by_device_and_model():
    tiny = Settings(model="tiny-flux")
    assert cpu_mode(inputs(Settings(device="cpu")), None, torch) == "DEVICE=cpu"
    assert cpu_mode(inputs(tiny), False, torch) is None and cpu_mode(inputs(tiny), True, torch)
    assert cpu_mode(preflight.Inputs(model_label="black-forest-labs/FLUX.1-dev"), None, torch) is None  # a hub model
    assert cpu_mode(inputs(Settings(model="tiny-flux", device="cuda")), None, torch) is None
    if not torch.cuda.is_available():
        assert "no GPU" in cpu_mode(inputs(tiny), None, torch)


def test_a_crashing_check_is_a_failed_check_not_a_crashed_preflight():
    from preflight.runner import timed

    check, extra = timed("cuda", lambda: {}["boom"])
    assert (check.id, check.status, extra) == ("cuda", "fail", None) and "KeyError" in check.detail


def test_cpu_run_skips_gpu_checks_and_plans_fp32(tmp_path):
    report = preflight.run(inputs(Settings(output_uri=str(tmp_path), cache_dir=str(tmp_path))), cpu=True)
    assert report.ok and (report.plan.device, report.plan.precision) == ("cpu", "fp32")
    statuses = {c.id: c.status for c in report.checks}
    assert list(statuses) == ["torch", "cuda", "driver", "arch", "cudnn", "precision", "torchao", "pins", "vram",
                              "disk", "storage"]
    assert {statuses[c] for c in ("cuda", "driver", "arch", "cudnn", "torchao", "pins", "vram")} == {"skipped"}
    assert "CPU mode" in report.check("cuda").detail and report.failures() == ""
    table = report.table()
    assert "preflight OK: 0 failed" in table and "plan: fp32 on cpu" in table
    assert all(f"{c.id} " in table for c in report.checks)
    refused = preflight.run(inputs(Settings(output_uri=str(tmp_path), precision="fp8")), cpu=True)
    assert not refused.ok and refused.failures().startswith("precision: PRECISION=fp8 needs a GPU")


def cli(*args, env=None, pythonpath=None):
    """`python -m preflight ARGS` in a fresh process with `env` over a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OUTPUT_", "DEVICE", "PRECISION"))}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p)
    return subprocess.run([sys.executable, "-m", "preflight", *args], cwd=ROOT, env=base | (env or {}),
                          capture_output=True, text=True, timeout=120)


@NO_GPU
def test_cli_without_a_gpu_fails_cuda(tmp_path):
    out = cli("--json", env={"OUTPUT_URI": str(tmp_path), "CACHE_DIR": str(tmp_path)})
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert set(report) == {"ok", "plan", "gpu", "checks", "elapsed_ms"} and report["ok"] is False
    assert {c["id"]: c["status"] for c in report["checks"]}["cuda"] == "fail"


def test_cli_cpu_mode_passes_with_a_writable_folder(tmp_path):
    out = cli("--cpu", "--json", env={"OUTPUT_URI": str(tmp_path / "out"), "CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["plan"]["precision"] == "fp32" and report["plan"]["requested"] == "auto"
    assert all(set(c) == {"id", "status", "detail", "ms"} for c in report["checks"])


def test_cli_bad_usage_exits_2():
    assert cli("--no-such-flag").returncode == 2
    assert cli("--cpu", env={"PRECISION": "fp16"}).returncode == 2


def test_cli_never_prints_the_secret(s3_auth, s3_endpoint):
    bucket, key_id, _ = s3_auth
    marker = "SECRET-MARKER-7f3a9c"
    env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": marker, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": s3_endpoint, "OUTPUT_URI": f"s3://{bucket}/out", "LOG_LEVEL": "DEBUG"}
    out = cli("--cpu", "--json", env=env)
    assert out.returncode == 1
    assert {c["id"]: c["status"] for c in json.loads(out.stdout)["checks"]}["storage"] == "fail"
    assert marker not in out.stdout + out.stderr


def test_cli_names_a_missing_cuda_library(tmp_path):
    fake = tmp_path / "site" / "torch"  # a torch whose import fails as a wheel without its cuDNN does
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise OSError('libcudnn.so.9: cannot open shared object file: No such file or directory')\n")
    out = cli("--json", env={"OUTPUT_URI": str(tmp_path / "out")}, pythonpath=str(tmp_path / "site"))
    assert out.returncode == 1, out.stderr
    checks = {c["id"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["torch"]["status"] == "fail" and "libcudnn.so.9 not found" in checks["torch"]["detail"]
    assert "cuDNN 9" in checks["torch"]["detail"] and checks["cuda"]["status"] == "skipped"
    assert checks["storage"]["status"] == "ok"


def test_check_torch_reports_the_build():
    check, module = check_torch()
    assert check.status == "ok" and module is torch and torch.__version__ in check.detail


def test_service_load_stops_before_weights_when_preflight_fails(tmp_path, monkeypatch):
    import app.service

    def load_pipeline(*a, **kw):
        raise AssertionError("weights were touched after a failed preflight")

    monkeypatch.setattr(app.service, "load_pipeline", load_pipeline)  # a tripwire, not a stand-in
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkerBroken, match="preflight failed: storage: .* not writable"):
        app.service.Service.load(Settings(device="cpu", output_uri=str(tmp_path / "file" / "out")))
    if not torch.cuda.is_available():
        with pytest.raises(WorkerBroken, match="preflight failed: cuda: "):
            app.service.Service.load(Settings(device="cuda", output_uri=str(tmp_path)))


def test_service_load_runs_preflight_and_takes_its_plan(tmp_path):
    from app.service import Service

    service = Service.load(Settings(device="cpu", output_uri=str(tmp_path), cache_dir=str(tmp_path), warmup=False))
    assert (service.plan.device, service.plan.precision) == ("cpu", "fp32")
    assert service.cold_start["preflight_ms"] < service.cold_start["load_total_ms"]


def runpod_handler(tmp_path, *args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNPOD_"))}
    base |= {"OUTPUT_URI": str(tmp_path), "CACHE_DIR": str(tmp_path), "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
             "PYTHONPATH": str(ROOT)} | env
    return subprocess.run([sys.executable, "handler.py", *args], cwd=ROOT, env=base, capture_output=True,
                          text=True, timeout=120)


@NO_GPU
def test_runpod_fitness_check_exits_a_worker_that_failed_preflight(tmp_path):
    # RUNPOD_WEBHOOK_GET_JOB makes the SDK run as on RunPod: fitness checks, then the job loop (never reached).
    out = runpod_handler(tmp_path, DEVICE="cuda", RUNPOD_WEBHOOK_GET_JOB=f"http://127.0.0.1:{free_port()}/job")
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "Fitness check failed: preflight_passed" in text and "preflight failed: cuda" in text
    assert "loaded tiny-flux" not in text  # no weights were loaded


@NO_GPU
def test_local_test_input_fails_the_job_when_preflight_failed(tmp_path):
    out = runpod_handler(tmp_path, "--test_input", json.dumps({"input": {"prompt": "x"}}), DEVICE="cuda")
    assert out.returncode == 1 and "worker_broken" in out.stdout + out.stderr
