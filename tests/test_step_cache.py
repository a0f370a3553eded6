"""Step caching on the real tiny FLUX pipeline: deterministic per seed, gone after the job."""

import pytest
import torch

from app.families.flux import FAMILY as FLUX
from app.step_cache import NAMES, cache_config, step_cache

STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    p = FLUX.build_tiny()
    p.set_progress_bar_config(disable=True)
    return p


def _latents(pipe, name):
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    with step_cache(pipe.transformer, name, STEPS, FLUX_MAG_RATIOS):
        return pipe("a cat", height=64, width=64, num_inference_steps=STEPS, max_sequence_length=64,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.mark.parametrize("name", [n for n in NAMES if n != "off"])
def test_cache_is_deterministic_and_removed_after_the_job(pipe, name):
    base = _latents(pipe, "off")
    a, b = _latents(pipe, name), _latents(pipe, name)
    assert torch.equal(a, b)
    assert not pipe.transformer.is_cache_enabled
    assert torch.equal(_latents(pipe, "off"), base)  # the next uncached job is exactly uncached


def test_a_skipping_cache_changes_the_result(pipe):
    # MagCache with FLUX's ratios skips steps even on the tiny model: the hook is really in the loop
    assert not torch.equal(_latents(pipe, "magcache"), _latents(pipe, "off"))


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
