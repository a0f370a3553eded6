"""Preflight on a CPU machine: every GPU failure mode at its narrowest seam, the rest for real.

What cannot run here is injected and named at each test: the card (a GpuFacts value: capability and
arch list), NVML's answers (pynvml's functions), torchao's extension record (torchao's skip flag,
torch.ops.loaded_libraries) and the FP8 kernel (the smoke function). Storage runs boto3 against a
real moto S3 server on loopback; the whole run, the CLI and handler.py are in test_preflight_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.config import Settings
from preflight.gpu import GIB, GpuFacts, arch_served, check_arch, check_driver
from preflight.precision import check_precision
from preflight.resources import check_disk, check_storage, check_vram, disk_verdict
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


def inputs(settings: Settings):
    """Preflight's plain inputs as the worker builds them from its settings and resolved model source."""
    from app.checks import preflight_inputs
    from app.source import resolve

    return preflight_inputs(settings, resolve(settings.model, settings.revision, settings.hf_offline))


# --- vram and disk ------------------------------------------------------------------------------------

def test_vram_needs_the_family_estimate_for_the_plan(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    i = inputs(Settings(model=str(tmp_path)))
    need, source = i.vram_need("bf16"), i.vram_source
    assert need == 36.0 and "flux" in source
    assert check_vram(card((9, 0), free_gib=20), need, source).status == "fail"
    assert check_vram(card((9, 0), free_gib=70), need, source).status == "ok"
    assert check_vram(card((9, 0)), None, "MODEL=x: cannot read").status == "warn"


def test_disk_measures_the_cache_folder_and_fails_when_short(tmp_path):
    check = check_disk(inputs(Settings(cache_dir=str(tmp_path / "not" / "yet"))))
    assert check.status == "ok" and str(tmp_path) in check.detail
    assert disk_verdict("caches", tmp_path, 0.5, 2.0).status == "fail"
    assert disk_verdict("weights", tmp_path, 10.0, 33.0, hard=False).status == "warn"


# --- storage: a real S3 endpoint on loopback -------------------------------------------------------------

def use_credentials(monkeypatch, key_id: str | None, secret: str | None = None) -> None:
    """Set the credential variables as a fresh worker process would see them. boto3's default session
    caches the credentials it resolved first, so it is dropped to make the next client read these."""
    import boto3

    if key_id is not None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    if secret is not None:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


def test_storage_writes_and_removes_its_probe(bucket):
    import boto3

    check = check_storage(inputs(Settings(output_uri=f"s3://{bucket}/results")))
    assert check.status == "ok" and f"s3://{bucket}/results writable" == check.detail
    assert boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_storage_names_a_missing_bucket(s3_env):
    check = check_storage(inputs(Settings(output_uri="s3://no-such-bucket-here/out")))
    assert check.status == "fail" and "NoSuchBucket" in check.detail and "does not exist" in check.detail


def test_storage_names_an_unreachable_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    check = check_storage(inputs(Settings(output_uri="s3://any/out")))
    assert check.status == "fail" and "endpoint unreachable" in check.detail


def test_storage_names_missing_credentials(s3_env, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    # Nowhere else to find keys either: no shared files, no instance metadata service.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    use_credentials(monkeypatch, None)
    check = check_storage(inputs(Settings(output_uri="s3://any/out")))
    assert check.status == "fail" and "no credentials" in check.detail


def test_storage_names_a_bad_local_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    check = check_storage(inputs(Settings(output_uri=str(tmp_path / "file" / "out"))))
    assert check.status == "fail" and "not writable" in check.detail


def test_storage_names_wrong_credentials_and_access_denied(s3_auth, monkeypatch):
    bucket, key_id, secret = s3_auth
    settings = Settings(output_uri=f"s3://{bucket}/out")
    use_credentials(monkeypatch, "AKIANOTKNOWNANYWHERE")
    check = check_storage(inputs(settings))
    assert check.status == "fail" and "InvalidAccessKeyId" in check.detail
    use_credentials(monkeypatch, key_id)  # a real key id with the fixture's (wrong) secret
    check = check_storage(inputs(settings))
    assert check.status == "fail" and "SignatureDoesNotMatch" in check.detail
    use_credentials(monkeypatch, key_id, secret)  # the right keys of a user without any policy
    check = check_storage(inputs(settings))
    assert check.status == "fail" and "AccessDenied" in check.detail


def test_torchao_is_checked_only_for_int8_plans(monkeypatch):
    # FP8 runs on FP8Linear: the check must not import torchao (4-5 s on H100) for it.
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *a, **kw):
        if name == "torchao" or name.startswith("torchao."):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    assert check_torchao("fp8").status == "skipped"
    int8 = check_torchao("int8")
    assert int8.status == "fail" and "torchao" in int8.detail and "0.18.0" in int8.detail


def test_pins_accept_torchao_absent_but_not_another_version():
    assert compare_pins(PINS, dict(PINS, torchao="not installed")).status == "ok"
    assert compare_pins(PINS, dict(PINS, torchao="0.17.0")).status == "fail"
