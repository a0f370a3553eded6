"""Service.run: the result's shape, timings, cost, cold start, seeds, progress, and each failure mode."""

import pytest

from app.config import Settings
from app.cost import job_cost, price_per_hour
from app.schema import MAX_SEED, JobResult
from app.service import Service

FAST = {"num_inference_steps": 2}


def using(service: Service, **settings) -> Service:
    """The session's loaded pipeline under other settings (loading again would cost seconds)."""
    new = service.settings.model_copy(update=settings)
    return Service(service.pipe, service.source, new, service.plan, service.store, {})


def test_result_shape(tiny_flux_service):
    out = tiny_flux_service.run({"prompt": "a red sneaker", "seed": 7, "width": 256, "height": 272, **FAST}, "shape-1")
    assert set(out) >= {"images", "model", "timings", "cost"} and "error" not in out
    JobResult.model_validate(out)
    (img,) = out["images"]
    assert set(img) == {"url", "key", "width", "height", "seed", "content_type", "bytes"}
    assert (img["width"], img["height"], img["seed"], img["content_type"]) == (256, 272, 7, "image/png")
    assert img["key"] == "shape-1/0.png" and img["url"].endswith("/shape-1/0.png") and img["bytes"] > 0
    assert out["model"] == "tiny-flux"
    t = out["timings"]
    assert set(t) == {"validate_ms", "text_encode_ms", "text_cache", "inference_ms", "encode_ms", "upload_ms",
                      "total_ms"}
    assert t.pop("text_cache") in ("hit", "miss")
    assert all(v >= 0 for v in t.values()) and t["text_encode_ms"] <= t["inference_ms"]
    assert t["inference_ms"] > 0 and t["total_ms"] >= t["inference_ms"] + t["encode_ms"]
    assert out["cost"]["gpu"] == "cpu" and out["cost"]["usd"] == 0.0
    assert out["cost"]["gpu_seconds"] == pytest.approx(t["total_ms"] / 1000, abs=1e-3)


def test_cost_uses_the_gpu_price_override(tiny_flux_service):
    out = using(tiny_flux_service, gpu_price_per_hour=3600.0).run({"prompt": "a cat", "seed": 1, **FAST}, "cost-1")
    seconds = out["cost"]["gpu_seconds"]
    assert seconds > 0
    assert out["cost"]["usd"] == pytest.approx(seconds, abs=1e-3)  # 3600 USD/h is 1 USD/s


def test_price_table():
    assert price_per_hour("NVIDIA H100 80GB HBM3") == 4.176  # RunPod serverless flex, per second x 3600
    assert price_per_hour("NVIDIA RTX A4000") == 0.576  # the longer name wins over "A40"
    assert price_per_hour("NVIDIA H200") == 5.58
    assert price_per_hour("Some Future GPU") == 0.0
    assert price_per_hour("NVIDIA H100 80GB HBM3", override=1.5) == 1.5
    assert job_cost("NVIDIA H100 80GB HBM3", 36.0) == {"gpu": "NVIDIA H100 80GB HBM3", "gpu_seconds": 36.0,
                                                      "usd": pytest.approx(4.176 / 100)}


def test_cold_start_is_reported_on_the_first_result_only(tmp_path):
    service = Service.load(Settings(model="tiny-flux", output_uri=str(tmp_path), preflight=False, device="cpu",
                                    warmup=True, shapes="256x256"))
    bad = service.run({"prompt": ""}, "cold-0")
    assert "cold_start" not in bad  # an error is not a result
    first = service.run({"prompt": "a cat", "seed": 1, **FAST}, "cold-1")
    second = service.run({"prompt": "a cat", "seed": 1, **FAST}, "cold-2")
    cold = first["cold_start"]
    assert set(cold) == {"source_ms", "preflight_ms", "store_ms", "weights_ms", "optimize_ms", "compile_cache_ms", "warmup_ms",
                         "load_total_ms", "memory_plan"}
    assert cold["weights_ms"] > 0 and cold["warmup_ms"] > 0 and cold["memory_plan"] == "resident"
    assert cold["load_total_ms"] >= sum(v for k, v in cold.items() if k.endswith("_ms") and k != "load_total_ms") - 1
    assert "cold_start" not in second


def test_a_seed_is_drawn_and_reported_when_absent(tiny_flux_service):
    runs = [tiny_flux_service.run({"prompt": "a cat", **FAST}, f"noseed-{i}") for i in range(2)]
    seeds = [r["images"][0]["seed"] for r in runs]
    assert all(isinstance(s, int) and 0 <= s <= MAX_SEED for s in seeds)
    assert seeds[0] != seeds[1]
    replay = tiny_flux_service.run({"prompt": "a cat", "seed": seeds[0], **FAST}, "noseed-replay")
    assert replay["images"][0]["bytes"] == runs[0]["images"][0]["bytes"]


def test_num_images(tiny_sdxl_service):
    out = tiny_sdxl_service.run({"prompt": "a cat", "seed": 100, "num_images": 3, **FAST}, "many")
    assert [im["seed"] for im in out["images"]] == [100, 101, 102]
    assert [im["key"] for im in out["images"]] == ["many/0.png", "many/1.png", "many/2.png"]
    assert len({im["url"] for im in out["images"]}) == 3


def test_progress_is_reported_per_step(tiny_flux_service):
    steps = []
    out = tiny_flux_service.run({"prompt": "a cat", "seed": 1, "num_inference_steps": 3}, "progress-1",
                                progress=lambda step, total: steps.append((step, total)))
    assert "error" not in out
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_invalid_input_is_an_error_naming_the_field(tiny_flux_service):
    out = tiny_flux_service.run({"prompt": "a cat", "width": 100000}, "bad-1")
    assert out == {"error": {"type": "invalid_input", "field": "width", "message": out["error"]["message"]}}
    assert "width" in out["error"]["message"]
    assert not tiny_flux_service.broken


def test_a_job_past_its_timeout_fails(tiny_flux_service):
    out = using(tiny_flux_service, job_timeout_s=1e-6).run({"prompt": "a cat", "seed": 1, **FAST}, "slow-1")
    assert out["error"]["type"] == "timeout" and "JOB_TIMEOUT_S" in out["error"]["message"]
    assert "images" not in out


def test_an_unexpected_error_gives_a_clean_message(tiny_flux_service):
    def explode(step, total):
        raise ValueError("internal detail that must not reach the caller")

    svc = using(tiny_flux_service)
    out = svc.run({"prompt": "a cat", "seed": 1, **FAST}, "bug-1", progress=explode)
    assert out == {"error": {"type": "job_failed", "message": "internal error while running the job"}}
    assert not svc.broken
    assert "error" not in svc.run({"prompt": "a cat", "seed": 1, **FAST}, "bug-2")


def test_a_poisoned_cuda_context_breaks_the_worker(tiny_flux_service):
    def poisoned(step, total):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    svc = using(tiny_flux_service)
    out = svc.run({"prompt": "a cat", "seed": 1, **FAST}, "cuda-1", progress=poisoned)
    assert out["error"]["type"] == "worker_broken" and svc.broken
    after = svc.run({"prompt": "a cat", "seed": 1, **FAST}, "cuda-2")
    assert after["error"]["type"] == "worker_broken"  # it refuses work until it is replaced


@pytest.mark.parametrize("job_id", ["../escape", "a/b", "", "x" * 200, None, 7, ".hidden"])
def test_an_unusable_job_id_is_refused_before_any_gpu_work(tiny_flux_service, job_id):
    calls = []
    hook = tiny_flux_service.pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = tiny_flux_service.run({"prompt": "a cat", "num_inference_steps": 1}, job_id)
    finally:
        hook.remove()
    assert out["error"]["type"] == "invalid_input" and out["error"]["field"] == "id", out
    assert calls == [] and not tiny_flux_service.broken
