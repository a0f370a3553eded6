"""Settings.from_env: defaults, parsing, the hub's own HF_HUB_OFFLINE, and bad values naming the variable."""

import os
from pathlib import Path

import pytest

from app.config import Settings, parse_shapes, secret_values
from app.errors import WorkerBroken


def test_defaults_give_the_cpu_demo():
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.model, s.output_uri, s.presign_ttl_s, s.log_format) == ("tiny-flux", "./outputs", 7 * 24 * 3600, "text")
    assert s.gpu_price_per_hour is None and s.shapes is None and s.hf_offline is False


def test_every_field_is_read_from_its_upper_case_variable():
    env = {"MODEL": "tiny-sdxl", "REVISION": "abc", "OUTPUT_URI": "s3://b/p", "PRESIGN_TTL_S": "60",
           "GPU_PRICE_PER_HOUR": "2.5", "LOG_FORMAT": "json", "LOG_LEVEL": "debug", "DEVICE": "cpu",
           "PRECISION": "bf16", "COMPILE": "off", "DYNAMIC": "all", "ATTENTION": "cudnn", "CUDA_GRAPHS": "1", "SHAPES": "512x512", "COMPILE_CACHE_URI": "s3://b/cc",
           "WEIGHTS_URI": "s3://b/w", "CACHE_DIR": "/c", "JOB_TIMEOUT_S": "12.5", "PREFLIGHT": "0",
           "WARMUP": "false", "HF_OFFLINE": "true", "MEMORY_PLAN": "offload-text", "TEXT_ENCODERS": "fp8",
           "PREFETCH_WEIGHTS": "0", "TEXT_CACHE_MB": "0", "TEXT_BUCKETS": "1", "STEP_CACHE": "fbcache", "LORAS": "1", "LORA_MAX_RANK": "32", "LORA_CACHE": "/l", "LORA_CACHE_MB": "100"}
    assert {f.upper() for f in Settings.model_fields} == set(env)
    s = Settings.from_env(env)
    assert s.model_dump() == dict(
        model="tiny-sdxl", revision="abc", hf_offline=True, output_uri="s3://b/p", presign_ttl_s=60,
        gpu_price_per_hour=2.5, log_format="json", log_level="DEBUG", device="cpu", precision="bf16",
        compile="off", dynamic="all", attention="cudnn", cuda_graphs=True, shapes=[(512, 512)], compile_cache_uri="s3://b/cc", weights_uri="s3://b/w",
        cache_dir="/c", job_timeout_s=12.5, preflight=False, warmup=False, memory_plan="offload-text",
        text_encoders="fp8", prefetch_weights=False, text_cache_mb=0, text_buckets=True, step_cache="fbcache",
        loras=True, lora_max_rank=32, lora_cache="/l", lora_cache_mb=100)


@pytest.mark.parametrize("name,value", [("MEMORY_PLAN", "offload"), ("TEXT_ENCODERS", "int8"),
                                        ("TEXT_CACHE_MB", "-1"), ("STEP_CACHE", "teacache"),
                                        ("LORA_MAX_RANK", "40"), ("LORA_MAX_RANK", "8")])
def test_a_memory_setting_out_of_its_choices_is_refused_by_name(name, value):
    with pytest.raises(WorkerBroken) as e:
        Settings.from_env({name: value})
    assert e.value.field == name and f"bad configuration {name}" in e.value.message


@pytest.mark.parametrize("value", ["auto", "native", "cudnn", "flash", "fa3", "fa3_fp8"])
def test_every_attention_backend_is_accepted(value):
    assert Settings.from_env({"ATTENTION": value}).attention == value


def test_empty_values_mean_default():
    assert Settings.from_env({"MODEL": "", "PRESIGN_TTL_S": ""}) == Settings()


@pytest.mark.parametrize("text, shapes", [
    ("1024x1024", [(1024, 1024)]),
    ("1344x768, 768X1344,", [(1344, 768), (768, 1344)]),
    ("", []),
])
def test_shapes_parsing(text, shapes):
    assert parse_shapes(text) == shapes
    if text:
        assert Settings.from_env({"SHAPES": text}).shapes == shapes


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)])
def test_hf_hub_offline_is_honoured(value, offline):
    assert Settings.from_env({"HF_HUB_OFFLINE": value}).hf_offline is offline


@pytest.mark.parametrize("env, name", [
    ({"SHAPES": "banana"}, "SHAPES"),
    ({"SHAPES": "1024"}, "SHAPES"),
    ({"PRESIGN_TTL_S": "0"}, "PRESIGN_TTL_S"),
    ({"PRESIGN_TTL_S": str(8 * 24 * 3600)}, "PRESIGN_TTL_S"),  # S3 presigned URLs live 7 days at most
    ({"GPU_PRICE_PER_HOUR": "cheap"}, "GPU_PRICE_PER_HOUR"),
    ({"GPU_PRICE_PER_HOUR": "-1"}, "GPU_PRICE_PER_HOUR"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"DEVICE": "tpu"}, "DEVICE"),
    ({"PRECISION": "fp4"}, "PRECISION"),
    ({"ATTENTION": "fast"}, "ATTENTION"),
    ({"ATTENTION": "fa3-fp8"}, "ATTENTION"),  # the value is spelled with an underscore
    ({"ATTENTION": "fp8"}, "ATTENTION"),
    ({"JOB_TIMEOUT_S": "0"}, "JOB_TIMEOUT_S"),
    ({"PREFLIGHT": "maybe"}, "PREFLIGHT"),
])
def test_a_bad_value_breaks_the_worker_naming_the_variable(env, name):
    with pytest.raises(WorkerBroken) as e:
        Settings.from_env(env)
    assert e.value.field == name and name in e.value.message


def test_secret_values_are_collected_for_redaction():
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "HF_TOKEN": "hf_abcdef", "MODEL": "tiny-flux", "API_TOKEN": "x"}
    assert sorted(secret_values(env)) == ["hf_abcdef", "s3cr3t-value"]  # 1-char values would redact everything


@pytest.mark.parametrize("raw, expected", [(None, None), ("0", False), ("false", False), ("1", True), ("true", True)])
def test_cuda_graphs_unset_leaves_the_choice_to_the_family(raw, expected):
    env = {} if raw is None else {"CUDA_GRAPHS": raw}
    assert Settings.from_env(env).cuda_graphs is expected


def test_a_bad_cuda_graphs_value_names_the_variable():
    with pytest.raises(WorkerBroken, match="CUDA_GRAPHS"):
        Settings.from_env({"CUDA_GRAPHS": "sometimes"})


@pytest.mark.parametrize("shapes,needle", [("0x0", "0x0: width: must be between"),
                                           ("1024x1024,3008x256", "3008x256: width: must be between"),
                                           ("1000x1024", "1000x1024: width: must be a multiple of 16"),
                                           ("2048x2048,4096x16", "4096x16")])
def test_shapes_outside_the_family_are_refused_at_start_before_any_weight(shapes, needle, tmp_path, monkeypatch):
    import app.service
    from app.service import Service

    monkeypatch.setattr(app.service, "load_pipeline", lambda *a, **k: pytest.fail("weights were read"))  # tripwire
    with pytest.raises(WorkerBroken, match=needle) as e:
        Service.load(Settings(shapes=shapes, output_uri=str(tmp_path), preflight=False, device="cpu"))
    assert e.value.field == "SHAPES" and "bad configuration SHAPES" in e.value.message


@pytest.mark.parametrize("text", ["axb", "1024", "1024x", "x1024", "-16x16"])
def test_malformed_shapes_name_the_variable(text):
    with pytest.raises(WorkerBroken, match="SHAPES") as e:
        Settings.from_env({"SHAPES": text})
    assert e.value.field == "SHAPES"


def test_app_run_prints_a_refusal_not_a_traceback(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "SHAPES", "PRECISION")}
    variables = ({"PRECISION": "fp9"}, {"MODEL": str(tmp_path / "missing")}, {"SHAPES": "0x0"})
    procs = [subprocess.Popen([sys.executable, "-m", "app", "run", '{"prompt": "a"}'], env=env | var, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
             for var in variables]  # concurrently: each spends its seconds importing torch
    for var, proc in zip(variables, procs):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-1500:]
        assert "worker did not start" in stderr and next(iter(var)) in stderr
