"""Opt-in step caching: diffusers' cache hooks (First Block Cache, TaylorSeer, MagCache) around one job.

A cached step reuses earlier steps' block outputs where the model changes little, trading a
deviation from the uncached image for speed; it is off unless the worker (`STEP_CACHE`) or the job
(`cache`) asks. The hooks are attached for the job and removed after it, so the next job runs
exactly as if they had never been on. They work with the compiled recipe because the regional
compile compiles each block's `forward` (app.optimize.compile_denoiser): the hooks, which call
`torch.compiler.disable`d code, then wrap compiled blocks and run eagerly between them, instead of
being traced inside a fullgraph. Random weights cannot show the perceptual cost: docs/warm-path.md.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from app.errors import InvalidInput, WorkerBroken

if TYPE_CHECKING:
    from app.schema import Job

NAMES = ("off", "fbcache", "taylorseer", "magcache")
FBCACHE_THRESHOLD = 0.05  # diffusers' default; ParaAttention's FLUX figures use 0.08-0.12
MAGCACHE_THRESHOLD = 0.06  # diffusers' default
# TaylorSeer on whole blocks (diffusers' default hooks the attention modules inside them, which a
# compiled block would have to trace): every block's output predicted between full steps
TAYLORSEER_BLOCKS = (r"^(transformer_blocks|single_transformer_blocks|blocks)\.\d+$",)


def cache_config(name: str, steps: int, mag_ratios=None):
    """The diffusers config for `name` (None for off); `mag_ratios` calibrates MagCache for one model."""
    if name == "off":
        return None
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if name == "fbcache":
        return FirstBlockCacheConfig(threshold=FBCACHE_THRESHOLD)
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3, max_order=1,
                                     cache_identifiers=list(TAYLORSEER_BLOCKS))
    if name == "magcache":
        if mag_ratios is None:
            raise ValueError("magcache needs the model's calibrated magnitude ratios")
        return MagCacheConfig(threshold=MAGCACHE_THRESHOLD, num_inference_steps=steps, mag_ratios=mag_ratios)
    raise ValueError(f"unknown step cache {name!r} (one of {', '.join(NAMES)})")


def unsupported(denoiser, recipe) -> str | None:
    """Why step caches cannot run on this (optimized) denoiser; None when they can."""
    from torch._dynamo.eval_frame import OptimizedModule

    if recipe is not None and recipe.cuda_graphs:
        return "a CUDA graph replays a fixed denoiser call (set CUDA_GRAPHS=0 to use a step cache)"
    if isinstance(denoiser, OptimizedModule):
        return "the whole denoiser is compiled as one graph (COMPILE=regional or off for a step cache)"
    if not hasattr(denoiser, "enable_cache"):
        return f"{type(denoiser).__name__} has no diffusers cache hooks"
    return None


def refusal(name: str, blocked: str | None, mag_ratios, model: str) -> str | None:
    """Why step cache `name` cannot run on this worker (None: it can); `blocked` is `unsupported`'s
    answer for its denoiser, `mag_ratios` the serving family's MagCache calibration."""
    if name == "off":
        return None
    if blocked:
        return blocked
    if name == "magcache" and mag_ratios is None:
        return f"MagCache has no calibration for {model} (fbcache and taylorseer need none)"
    return None


def for_job(job: Job, default: str, blocked: str | None, mag_ratios, model: str) -> Job:
    """`job` with the step cache it runs (its own, else `default`: STEP_CACHE); InvalidInput naming
    `cache` when that one cannot run here."""
    name = job.cache or default
    why = refusal(name, blocked, mag_ratios, model)
    if why:
        raise InvalidInput(f"cache: {name} cannot run on this worker: {why}", field="cache")
    return job if job.cache == name else job.model_copy(update={"cache": name})


def warm_with_default(warm_jobs: list, default: str, blocked: str | None, mag_ratios, model: str) -> list:
    """The warm-up jobs under the worker's STEP_CACHE; WorkerBroken naming STEP_CACHE when it cannot run
    here (the worker's default must run, or the worker is misconfigured)."""
    if default == "off":
        return warm_jobs
    why = refusal(default, blocked, mag_ratios, model)
    if why:
        raise WorkerBroken(f"bad configuration STEP_CACHE: {default}: {why}", field="STEP_CACHE")
    return [w._replace(job=w.job.model_copy(update={"cache": default})) for w in warm_jobs]


@contextmanager
def step_cache(denoisers, name: str, steps: int, mag_ratios=None):
    """Run the block with `name`'s cache on each of `denoisers` (one module or several), and always
    without it afterwards."""
    config = cache_config(name, steps, mag_ratios)
    if config is None:
        yield
        return
    import copy

    mods = denoisers if isinstance(denoisers, (list, tuple)) else [denoisers]
    with ExitStack() as stack:
        for den in mods:
            den.enable_cache(copy.deepcopy(config))  # hooks keep state on their config: one each
            stack.callback(den.disable_cache)
            # the hooks' state needs a context: pipelines that set none (FLUX img2img, Kontext) run in
            # this one; those that do (cond / uncond per call) replace it for each call
            stack.enter_context(den.cache_context("cond"))
        yield
