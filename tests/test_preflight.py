"""Preflight on a CPU machine: every GPU failure mode at its narrowest seam, the rest for real.

What cannot run here is injected and named at each test: the card (a GpuFacts value: capability and
arch list), NVML's answers (pynvml's functions), torchao's extension record (torchao's skip flag,
torch.ops.loaded_libraries) and the FP8 kernel (the smoke function). Storage runs boto3 against a
real moto S3 server on loopback; the CLI and handler.py run as real subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

import preflight
from app.config import Settings
from app.errors import WorkerBroken
from preflight.gpu import GIB, GpuFacts, arch_served, check_arch, check_driver, check_torch
from preflight.precision import check_precision
from preflight.resources import check_disk, check_storage, check_vram, disk_verdict, vram_need
from preflight.runner import cpu_mode
from preflight.software import FIX, check_torchao, compare_pins, read_pins
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what a machine without a GPU reports")
PINS = {"torch": "2.11.0", "torchao": "0.18.0", "diffusers": "0.42.1"}


def card(cap, arch=("sm_80", "sm_86", "sm_90", "sm_100", "sm_120"), free_gib=70.0):
    """A simulated device 0 (the capability and arch-list seam)."""
    return GpuFacts("Test GPU", cap, 1, tuple(arch), int(free_gib * GIB), int(80 * GIB))


def no_smoke():
    raise AssertionError("the FP8 smoke test must not run below capability 8.9")


# --- precision: the capability value decides the plan ---------------------------------------------

@pytest.mark.parametrize("cap", [(8, 0), (8, 6)])
def test_ampere_plans_int8_and_refuses_forced_fp8(cap):
    check, plan = check_precision("auto", card(cap), smoke=no_smoke)
    assert (check.status, plan.precision, plan.device, plan.capability) == ("ok", "int8", "cuda", cap)
    check, _ = check_precision("fp8", card(cap), smoke=no_smoke)
    assert check.status == "fail" and "PRECISION=fp8" in check.detail and "8.9" in check.detail
    assert check_precision("bf16", card(cap), smoke=no_smoke)[1].precision == "bf16"


def test_hopper_plans_fp8_only_when_the_fp8_kernel_runs():
    check, plan = check_precision("auto", card((9, 0)), smoke=lambda: None)  # FP8 kernel seam: it ran
    assert (check.status, plan.precision) == ("ok", "fp8")
    broken = lambda: "no kernel image is available"  # noqa: E731  FP8 kernel seam: it failed
    check, plan = check_precision("auto", card((9, 0)), smoke=broken)
    assert (check.status, plan.precision) == ("warn", "int8") and "no kernel image" in check.detail
    check, _ = check_precision("fp8", card((9, 0)), smoke=broken)
    assert check.status == "fail" and "smoke test failed" in check.detail


def test_blackwell_reports_fp4_and_turing_runs_bf16():
    check, plan = check_precision("auto", card((10, 0)), smoke=lambda: None)
    assert plan.fp4_available and plan.precision == "fp8" and "FP4 available" in check.detail
    check, plan = check_precision("int8", card((7, 5)), smoke=no_smoke)
    assert check.status == "fail" and plan.precision == "bf16"


# --- arch: the arch list decides whether the card has kernels ----------------------------------------

def test_rtx_5090_without_sm_120_fails_arch_with_the_fix():
    check = check_arch(card((12, 0), arch=("sm_80", "sm_86", "sm_90", "sm_100")))
    assert check.status == "fail"
    assert "sm_120" in check.detail and "CUDA 12.8+" in check.detail and "requirements/gpu.txt" in check.detail


@pytest.mark.parametrize("cap, arch, served", [
    ((8, 6), ("sm_80",), "sm_80"),  # same major, newer minor: torch counts it
    ((9, 0), ("sm_80", "sm_90a"), "sm_90a"),
    ((8, 0), ("sm_86",), None),  # sm_86 code does not run on an 8.0 card
    ((12, 0), ("sm_90", "sm_100"), None),  # nothing crosses a major version
    ((12, 0), ("sm_120", "compute_120"), "sm_120"),
])
def test_arch_served_follows_torchs_rule(cap, arch, served):
    assert arch_served(cap, arch) == served


# --- driver: NVML's answers vs the CUDA runtime --------------------------------------------------------

@pytest.fixture
def nvml(monkeypatch):
    """NVML answers as a host with driver 535 (CUDA 12.2) gives them (the NVML seam)."""
    import pynvml

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "535.104.05")
    monkeypatch.setattr(pynvml, "nvmlSystemGetCudaDriverVersion", lambda: 12020)


def test_driver_below_the_runtime_fails(nvml):
    check = check_driver("12.8")
    assert check.status == "fail"
    assert "535.104.05" in check.detail and "12.2" in check.detail and "570.26" in check.detail
    assert check.facts == {"driver": "535.104.05", "cuda_driver": "12.2"}
    assert check_driver("13.0").status == "fail"
    assert check_driver("12.1").status == "ok"


@NO_GPU
def test_no_driver_in_the_container_fails_driver():
    check = check_driver("12.8")  # real NVML: its library is absent on this machine
    assert check.status == "fail" and "no NVIDIA driver" in check.detail


# --- torchao: its extension record ----------------------------------------------------------------------

def test_torchao_skipped_extensions_fail_with_the_fix(monkeypatch):
    import torchao

    monkeypatch.setattr(torchao, "skip_loading_so_files", True)  # torchao's own flag on a torch mismatch
    monkeypatch.setattr(torchao, "_skip_reason", "incompatible torch version (found 2.10.0)")
    check = check_torchao()
    assert check.status == "fail" and "found 2.10.0" in check.detail and FIX in check.detail


def test_torchao_kernels_that_did_not_load_fail_and_loaded_ones_pass(monkeypatch):
    import torchao

    files = sorted(str(p.resolve()) for p in Path(torchao.__file__).parent.glob("_C*.so"))
    assert files, "torchao 0.18 ships compiled extensions"
    monkeypatch.setattr(torchao, "skip_loading_so_files", False)
    monkeypatch.setattr(torch.ops, "loaded_libraries", set())  # "Failed to load ..._C_cutlass_90a.abi3.so"
    check = check_torchao()
    assert check.status == "fail" and "_C_cutlass_90a.abi3.so" in check.detail and FIX in check.detail
    monkeypatch.setattr(torch.ops, "loaded_libraries", set(files))
    assert check_torchao().status == "ok"
    monkeypatch.setattr(torch.ops, "loaded_libraries", set(files[:1]))
    assert check_torchao().status == "warn"


# --- pins ---------------------------------------------------------------------------------------------

def test_pins_fail_on_a_torch_torchao_mismatch_and_warn_on_diffusers():
    assert read_pins(ROOT / "requirements" / "gpu.txt")["torch"] == "2.11.0"
    check = compare_pins(PINS, dict(PINS, torch="2.10.0+cu128"))
    assert check.status == "fail" and FIX in check.detail
    assert compare_pins(PINS, dict(PINS, torchao="0.17.0")).status == "fail"
    assert compare_pins(PINS, dict(PINS, diffusers="0.41.0")).status == "warn"
    assert compare_pins(PINS, dict(PINS, torch="2.11.1+cu130")).status == "warn"
    assert compare_pins(PINS, dict(PINS, torch="2.11.0+cu130")).status == "ok"


# --- vram and disk ------------------------------------------------------------------------------------

def test_vram_needs_the_family_estimate_for_the_plan(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    need, source = vram_need(Settings(model=str(tmp_path)), "bf16")
    assert need == 36.0 and "flux" in source
    assert check_vram(card((9, 0), free_gib=20), need, source).status == "fail"
    assert check_vram(card((9, 0), free_gib=70), need, source).status == "ok"
    assert check_vram(card((9, 0)), None, "MODEL=x: cannot read").status == "warn"


def test_disk_measures_the_cache_folder_and_fails_when_short(tmp_path):
    check = check_disk(Settings(cache_dir=str(tmp_path / "not" / "yet")))
    assert check.status == "ok" and str(tmp_path) in check.detail
    assert disk_verdict("caches", tmp_path, 0.5, 2.0).status == "fail"
    assert disk_verdict("weights", tmp_path, 10.0, 33.0, hard=False).status == "warn"


# --- storage: a real S3 endpoint on loopback -------------------------------------------------------------

def test_storage_writes_and_removes_its_probe(bucket):
    import boto3

    check = check_storage(Settings(output_uri=f"s3://{bucket}/results"))
    assert check.status == "ok" and f"s3://{bucket}/results writable" == check.detail
    assert boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_storage_names_a_missing_bucket(s3_env):
    check = check_storage(Settings(output_uri="s3://no-such-bucket-here/out"))
    assert check.status == "fail" and "NoSuchBucket" in check.detail and "does not exist" in check.detail


def test_storage_names_an_unreachable_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    check = check_storage(Settings(output_uri="s3://any/out"))
    assert check.status == "fail" and "endpoint unreachable" in check.detail


def test_storage_names_a_bad_local_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    check = check_storage(Settings(output_uri=str(tmp_path / "file" / "out")))
    assert check.status == "fail" and "not writable" in check.detail


@pytest.fixture
def s3_auth(s3_endpoint, s3_env, bucket):
    """moto with request signing enforced (its /moto-api/reset-auth switch) and one IAM user without
    any policy: (bucket, that user's key id, its secret). Turned back off afterwards."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_endpoint)
    iam.create_user(UserName=bucket)
    key = iam.create_access_key(UserName=bucket)["AccessKey"]

    def switch(value: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/moto-api/reset-auth", data=value.encode(),
                                                      headers={"Content-Type": "text/plain"})).read()

    switch("0")
    yield bucket, key["AccessKeyId"], key["SecretAccessKey"]
    switch("inf")


def use_credentials(monkeypatch, key_id: str, secret: str | None = None) -> None:
    """Set the credential variables as a fresh worker process would see them. boto3's default session
    caches the credentials it resolved first, so it is dropped to make the next client read these."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    if secret is not None:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


def test_storage_names_wrong_credentials_and_access_denied(s3_auth, monkeypatch):
    bucket, key_id, secret = s3_auth
    settings = Settings(output_uri=f"s3://{bucket}/out")
    use_credentials(monkeypatch, "AKIANOTKNOWNANYWHERE")
    check = check_storage(settings)
    assert check.status == "fail" and "InvalidAccessKeyId" in check.detail
    use_credentials(monkeypatch, key_id)  # a real key id with the fixture's (wrong) secret
    check = check_storage(settings)
    assert check.status == "fail" and "SignatureDoesNotMatch" in check.detail
    use_credentials(monkeypatch, key_id, secret)  # the right keys of a user without any policy
    check = check_storage(settings)
    assert check.status == "fail" and "AccessDenied" in check.detail


# --- the whole run, the CLI and the wiring --------------------------------------------------------------------

def test_cpu_mode_is_decided_by_device_and_model():
    tiny = Settings(model="tiny-flux")
    assert cpu_mode(Settings(device="cpu"), None, torch) == "DEVICE=cpu"
    assert cpu_mode(tiny, False, torch) is None and cpu_mode(tiny, True, torch)
    assert cpu_mode(Settings(model="black-forest-labs/FLUX.1-dev"), None, torch) is None
    assert cpu_mode(Settings(model="tiny-flux", device="cuda"), None, torch) is None
    if not torch.cuda.is_available():
        assert "no GPU" in cpu_mode(tiny, None, torch)


def test_cpu_run_skips_gpu_checks_and_plans_fp32(tmp_path):
    report = preflight.run(Settings(output_uri=str(tmp_path), cache_dir=str(tmp_path)), cpu=True)
    assert report.ok and (report.plan.device, report.plan.precision) == ("cpu", "fp32")
    statuses = {c.id: c.status for c in report.checks}
    assert list(statuses) == ["torch", "cuda", "driver", "arch", "cudnn", "precision", "torchao", "pins", "vram",
                              "disk", "storage"]
    assert {statuses[c] for c in ("cuda", "driver", "arch", "cudnn", "torchao", "pins", "vram")} == {"skipped"}
    assert "CPU mode" in report.check("cuda").detail and report.failures() == ""
    table = report.table()
    assert "preflight OK: 0 failed" in table and "plan: fp32 on cpu" in table
    assert all(f"{c.id} " in table for c in report.checks)
    refused = preflight.run(Settings(output_uri=str(tmp_path), precision="fp8"), cpu=True)
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
