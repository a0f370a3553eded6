"""The optimization recipe, applied in one fixed order, and the warm-up.

Order (each step depends on the ones before it):
  1. dtype          bf16 on GPU (done at load: the pipeline is built or loaded in plan.torch_dtype)
  2. fuse_qkv       fuse Q/K/V projections into one GEMM; must precede quantization, which would
                    otherwise freeze three separate weights (torchao even raises on fusing after)
  3. quantize       `weights.quantize.quantize_denoiser` (shared with the bake and the baked loader):
                    FP8 (sm_89+) FP8Linear on the denoiser's block linears, the family's skip list kept
                    bf16; INT8 (sm_80/86) torchao dynamic int8, same skip list; a no-op when baked;
                    then (`fuse_gelu_quant`, with FP8) FLUX's MLP outputs go to FP8 in one kernel
                    (app.fused: bench/results/variants_h200_s3.json)
  4. attention      the kernel chosen per GPU (app.attention)
  5. compile        regional (each repeated block class once: short compile) | full | off
  6. cuda_graphs    the whole denoiser call replayed from one CUDA graph per shape (app.cudagraphs);
                    last, since it records whatever the steps before produced

`choose_recipe(plan, settings, family)` turns the preflight plan into a Recipe; `apply_recipe` loops over
the steps; nothing here reads the environment.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch
from loguru import logger

from weights.quantize import fuse_qkv, quantize_denoiser


@dataclass(frozen=True)
class Recipe:
    fuse_qkv: bool = False
    quantize: str = "none"  # fp8 | int8 | none
    attention: str = "native"  # native | cudnn | flash | fa3 | fa3_fp8
    compile: str = "off"  # regional | full | off
    cuda_graphs: bool = False
    fuse_gelu_quant: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def choose_recipe(plan, settings, family=None) -> Recipe:
    """The recipe for a plan: everything on a CUDA GPU, nothing on the CPU (the tiny reference path).

    CUDA graphs follow CUDA_GRAPHS when it is set, else the family's default (`Family.cuda_graphs`)."""
    if plan.device != "cuda":
        return Recipe()
    quant = plan.precision if plan.precision in ("fp8", "int8") else "none"
    attention = settings.attention if settings.attention != "auto" else _auto_attention(plan.capability)
    graphs = settings.cuda_graphs if settings.cuda_graphs is not None else bool(family and family.cuda_graphs)
    return Recipe(fuse_qkv=True, quantize=quant, attention=attention, compile=settings.compile, cuda_graphs=graphs,
                  fuse_gelu_quant=quant == "fp8")


def _auto_attention(capability) -> str:
    """FA3 on Hopper (its kernels are sm_90 only); cuDNN's SDPA from Ampere on (it needs sm_80+);
    older cards keep PyTorch's default SDPA, which picks a kernel that exists there."""
    if capability == (9, 0):
        return "fa3"
    return "cudnn" if capability and capability >= (8, 0) else "native"


def _denoiser(pipe, family):
    return getattr(pipe, family.denoiser)


def _fuse_qkv(pipe, family, recipe):
    if not family.fuse_qkv:
        return
    freed = fuse_qkv(_denoiser(pipe, family))
    logger.info("fused QKV projections; dropped {:.2f} B unfused parameters", freed / 1e9)


def _quantize(pipe, family, recipe):
    done = quantize_denoiser(_denoiser(pipe, family), recipe.quantize, family.skips, fuse=family.fuse_qkv)
    logger.info("{}: {} linears quantized (0: already quantized, e.g. baked), skip list kept in high precision",
                recipe.quantize, len(done))
    if recipe.quantize == "fp8" and recipe.fuse_gelu_quant:
        from app.fused import fuse_gelu_quant

        logger.info("GELU + FP8 quantization fused in {} blocks", fuse_gelu_quant(_denoiser(pipe, family)))


def _attention(pipe, family, recipe):
    from app.attention import set_attention

    if recipe.attention != "native":
        used = set_attention(_denoiser(pipe, family), recipe.attention)
        logger.info("attention: {} requested, {} used", recipe.attention, used)


def _compile(pipe, family, recipe):
    den = _denoiser(pipe, family)
    if recipe.compile == "regional" and getattr(den, "_repeated_blocks", None):
        den.compile_repeated_blocks(fullgraph=True, dynamic=False)
    elif recipe.compile in ("regional", "full"):  # no repeated blocks declared: compile it whole
        setattr(pipe, family.denoiser, torch.compile(den, fullgraph=True, dynamic=False))


def _cuda_graphs(pipe, family, recipe):
    from app.cudagraphs import GraphedDenoiser

    setattr(pipe, family.denoiser, GraphedDenoiser(_denoiser(pipe, family)))


STEPS = (
    ("fuse_qkv", lambda r: r.fuse_qkv, _fuse_qkv),
    ("quantize", lambda r: r.quantize != "none", _quantize),
    ("attention", lambda r: r.attention != "native", _attention),
    ("compile", lambda r: r.compile != "off", _compile),
    ("cuda_graphs", lambda r: r.cuda_graphs, _cuda_graphs),
)


def apply_recipe(pipe, family, recipe: Recipe) -> dict:
    """Apply `recipe` to `pipe` in place, in the documented order; return ms per applied step."""
    applied = {}
    for attr in (family.denoiser, *family.extra_denoisers):  # Wan 2.2: both experts get the recipe
        if getattr(pipe, attr, None) is None:
            continue
        fam, tag = (family, "") if attr == family.denoiser else (replace(family, denoiser=attr), f"{attr}.")
        for name, wanted, step in STEPS:
            if wanted(recipe):
                t0 = time.perf_counter()
                step(pipe, fam, recipe)
                applied[tag + name] = round((time.perf_counter() - t0) * 1000, 1)
    logger.info("recipe {} applied: {}", recipe.to_dict(), applied)
    return applied


def warmup(pipe, family, jobs) -> dict:
    """Run each warm-up job (`Family.warmup_jobs`: one short job per shape bucket) through the same
    `generate` a job runs, so encoders and compiled graphs are ready; ms per shape.

    A job at a size outside the buckets still runs: with regional compilation it triggers one
    recompile of the block graphs for that shape (seconds, logged by torch), later jobs at that
    size are fast; past torch._dynamo's recompile limit it runs eager.
    """
    out = {}
    for job, images in jobs:
        t0 = time.perf_counter()
        family.generate(pipe, job, images=images)
        out[f"{job.width}x{job.height}"] = round((time.perf_counter() - t0) * 1000, 1)
    logger.info("warm-up: {}", out)
    return out
