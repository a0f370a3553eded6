"""Step caching on the real tiny FLUX pipeline, its blocks compiled as the recipe compiles them
(compile_denoiser's regional mode with torch.compile's "eager" backend: the same Dynamo tracing and
fullgraph check as on a GPU, without Inductor's minutes-long CPU codegen): deterministic per seed,
gone after the job; and the job field / STEP_CACHE through Service.run."""

import pytest
import torch

from app.errors import InvalidInput
from app.families.flux import FAMILY as FLUX
from app.optimize import compile_denoiser, graphs_compiled
from app.schema import parse_job
from app.step_cache import NAMES, cache_config, step_cache

STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    p = FLUX.build_tiny()
    p.set_progress_bar_config(disable=True)
    p.transformer = compile_denoiser(p.transformer, "regional", "auto", backend="eager")
    return p


def _latents(pipe, name):
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    with step_cache(pipe.transformer, name, STEPS, FLUX_MAG_RATIOS):
        return pipe("a cat", height=64, width=64, num_inference_steps=STEPS, max_sequence_length=64,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.fixture(scope="module")
def uncached(pipe):
    return _latents(pipe, "off")


@pytest.mark.parametrize("name", [n for n in NAMES if n != "off"])
def test_cache_runs_on_compiled_blocks_deterministically_and_is_removed_after_the_job(pipe, uncached, name):
    a = _latents(pipe, name)  # fullgraph blocks: a hook traced inside one would raise here
    before = graphs_compiled()
    b = _latents(pipe, name)
    assert torch.equal(a, b)
    assert graphs_compiled() == before  # the hooks run between compiled blocks: nothing recompiles
    assert not pipe.transformer.is_cache_enabled
    if name != "fbcache":  # both skip steps even on the tiny model at 8 steps: the hooks are in the loop
        assert not torch.equal(a, uncached)


def test_the_next_uncached_job_is_exactly_uncached(pipe, uncached):
    assert torch.equal(_latents(pipe, "off"), uncached)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "off"])
def test_a_pipeline_that_sets_no_cache_context_still_runs(pipe, name):
    """FluxImg2ImgPipeline and FluxKontextPipeline call the denoiser outside any cache_context: the hooks'
    state would have none (diffusers raises) without the job-wide one."""
    tiny = FLUX.tiny_variant()
    inputs = tiny.denoiser_inputs(pipe, 64, 64)
    inputs["timestep"] = inputs["timestep"] / 1000
    with step_cache(pipe.transformer, name, 2, tiny.magcache_ratios()), torch.inference_mode():
        for _ in range(2):
            pipe.transformer(**inputs)


def test_refusals():
    assert cache_config("off", 28) is None
    with pytest.raises(ValueError, match="magnitude ratios"):
        cache_config("magcache", 28)
    with pytest.raises(ValueError, match="unknown step cache"):
        cache_config("teacache", 28)


def test_cache_removed_when_the_job_fails(pipe):
    with pytest.raises(RuntimeError):
        with step_cache(pipe.transformer, "fbcache", STEPS):
            raise RuntimeError("denoiser failed")
    assert not pipe.transformer.is_cache_enabled


def test_the_job_field_is_validated_by_name():
    assert parse_job({"prompt": "a cat"}, FLUX).cache is None
    assert parse_job({"prompt": "a cat", "cache": "fbcache"}, FLUX).cache == "fbcache"
    for bad in ("teacache", 1, True):
        with pytest.raises(InvalidInput) as e:
            parse_job({"prompt": "a cat", "cache": bad}, FLUX)
        assert e.value.field == "cache" and "cache" in e.value.message


# ---- through Service.run: the job's cache, the worker's STEP_CACHE, refusals -----------------------------

JOB = {"prompt": "a red sneaker", "seed": 5, "width": 256, "height": 256, "num_inference_steps": 4}


def _service(service, **settings):
    from app.service import Service

    return Service(service.pipe, service.source, service.settings.model_copy(update=settings), service.plan,
                   service.store, {})


def _png(service, **job):
    from pathlib import Path

    out = service.run({**JOB, **job}, f"sc-{len(job)}-{job.get('cache')}")
    assert "error" not in out, out
    return Path(service.settings.output_uri, out["images"][0]["key"]).read_bytes()


def test_job_cache_and_worker_default(tiny_flux_service):
    # TaylorSeer predicts step 3 of 4 (full steps 0-2, then every 5th): it always changes the output
    worker = _service(tiny_flux_service, step_cache="taylorseer")
    by_job = _png(tiny_flux_service, cache="taylorseer")
    assert _png(worker) == by_job  # STEP_CACHE fills a job that sends none
    assert _png(worker, cache="off") != by_job  # a job opts out of the worker's default
    assert not tiny_flux_service.pipe.transformer.is_cache_enabled


def test_a_cache_this_worker_cannot_run_is_refused_naming_the_field(tiny_flux_service, tiny_sdxl_service):
    out = tiny_sdxl_service.run({**JOB, "cache": "fbcache"}, "sc-sdxl")
    assert out["error"]["field"] == "cache" and "UNet2DConditionModel has no diffusers cache hooks" in \
        out["error"]["message"]
    from dataclasses import replace

    svc = _service(tiny_flux_service)
    svc.family = replace(svc.family, mag_ratios=None)  # an uncalibrated model (e.g. FLUX.1-schnell)
    out = svc.run({**JOB, "cache": "magcache"}, "sc-uncal")
    assert out["error"]["field"] == "cache" and "no calibration" in out["error"]["message"]
    assert "error" not in svc.run({**JOB, "cache": "fbcache", "num_inference_steps": 1}, "sc-fb")


def test_a_worker_default_it_cannot_run_stops_the_worker_naming_the_setting(tmp_path):
    from app.config import Settings
    from app.errors import WorkerBroken
    from app.service import Service

    with pytest.raises(WorkerBroken) as e:
        Service.load(Settings(model="tiny-sdxl", output_uri=str(tmp_path), preflight=False, device="cpu",
                              warmup=False, step_cache="fbcache"))
    assert e.value.field == "STEP_CACHE" and "no diffusers cache hooks" in e.value.message
