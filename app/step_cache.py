"""Opt-in step caching: diffusers' cache hooks (First Block Cache, TaylorSeer, MagCache) around one job.

A cached step reuses the previous step's residuals where the model changes little, trading a
deviation from the uncached image for speed; it is off unless the worker (`STEP_CACHE`) or the job
(`cache`) asks. The hooks are attached for the job and removed after it, so the next job runs
exactly as if they had never been on. Random weights cannot show the perceptual cost: the figures
that can are in docs/speed.md.
"""

from __future__ import annotations

from contextlib import contextmanager

NAMES = ("off", "fbcache", "taylorseer", "magcache")
FBCACHE_THRESHOLD = 0.05  # diffusers' default; ParaAttention's FLUX figures use 0.08-0.12
MAGCACHE_THRESHOLD = 0.06


def cache_config(name: str, steps: int, mag_ratios=None):
    """The diffusers config for `name` (None for off); `mag_ratios` calibrates MagCache for one model."""
    if name == "off":
        return None
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if name == "fbcache":
        return FirstBlockCacheConfig(threshold=FBCACHE_THRESHOLD)
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3, max_order=1)
    if name == "magcache":
        if mag_ratios is None:
            raise ValueError("magcache needs the model's calibrated magnitude ratios")
        return MagCacheConfig(threshold=MAGCACHE_THRESHOLD, num_inference_steps=steps, mag_ratios=mag_ratios)
    raise ValueError(f"unknown step cache {name!r} (one of {', '.join(NAMES)})")


@contextmanager
def step_cache(denoiser, name: str, steps: int, mag_ratios=None):
    """Run the block with `name`'s cache on `denoiser`, and always without it afterwards."""
    config = cache_config(name, steps, mag_ratios)
    if config is None:
        yield
        return
    denoiser.enable_cache(config)
    try:
        yield
    finally:
        denoiser.disable_cache()
