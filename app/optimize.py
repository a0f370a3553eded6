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
  3b. lora          LORAS=1: a zero low-rank branch beside every denoiser linear (weights.lora_branch),
                    overwritten per job in place, so the graphs compiled next serve every LoRA
  4. attention      the kernel chosen per GPU (app.attention)
  5. compile        regional (each repeated block class once: short compile; each block's forward,
                    so step-cache hooks wrap compiled blocks) | full | off;
                    `dynamic` says which shapes one graph serves (see `warmup_plan`)
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
    # off: a static graph per (batch, size), a new one compiles inside the job; auto: Dynamo's automatic
    # dynamic shapes, made general by warm-up (see warmup_plan); all: dynamic from the first compile.
    dynamic: str = "auto"
    cuda_graphs: bool = False
    fuse_gelu_quant: bool = False
    lora_rank: int = 0  # LORAS=1: the per-job LoRA branches' rank (weights.lora_branch); 0: none

    def to_dict(self) -> dict:
        return asdict(self)


def choose_recipe(plan, settings, family=None) -> Recipe:
    """The recipe for a plan: everything on a CUDA GPU, nothing on the CPU (the tiny reference path).

    CUDA graphs follow CUDA_GRAPHS when it is set, else the family's default (`Family.cuda_graphs`)."""
    lora = settings.lora_max_rank if getattr(settings, "loras", False) else 0
    if plan.device != "cuda":
        return Recipe(lora_rank=lora)
    quant = plan.precision if plan.precision in ("fp8", "int8") else "none"
    attention = settings.attention if settings.attention != "auto" else _auto_attention(plan.capability)
    graphs = settings.cuda_graphs if settings.cuda_graphs is not None else bool(family and family.cuda_graphs)
    return Recipe(fuse_qkv=True, quantize=quant, attention=attention, compile=settings.compile,
                  dynamic=settings.dynamic, cuda_graphs=graphs, fuse_gelu_quant=quant == "fp8", lora_rank=lora)


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


def _lora(pipe, family, recipe):
    from weights.lora_branch import add_branches

    logger.info("LoRA branches (rank {}) on {} linears", recipe.lora_rank,
                add_branches(_denoiser(pipe, family), recipe.lora_rank))


def _attention(pipe, family, recipe):
    from app.attention import set_attention

    if recipe.attention != "native":
        used = set_attention(_denoiser(pipe, family), recipe.attention)
        logger.info("attention: {} requested, {} used", recipe.attention, used)


def _compile(pipe, family, recipe):
    setattr(pipe, family.denoiser, compile_denoiser(_denoiser(pipe, family), recipe.compile, recipe.dynamic))


DYNAMIC = {"off": False, "auto": None, "all": True}  # Recipe.dynamic -> torch.compile(dynamic=...)
# Graphs one compiled code object may hold before Dynamo runs it eager: the bucket graphs, the
# generalized ones, and room for what a job at an unforeseen shape adds (logged by `graphs_compiled`).
RECOMPILE_LIMIT = 64


def compile_denoiser(den, mode: str, dynamic: str, backend="inductor"):
    """`den` compiled as `mode` says (regional: each repeated block class; full: the whole module);
    returns what the pipeline must hold (the module itself, or its compiled wrapper)."""
    import torch._dynamo.config as dc

    if dynamic not in DYNAMIC:
        raise ValueError(f"unknown dynamic mode {dynamic!r} (one of {', '.join(DYNAMIC)})")
    dc.automatic_dynamic_shapes = True  # what "auto" relies on (torch's default, set in case it was changed)
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; older ones have the second
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), RECOMPILE_LIMIT))
    kw = dict(fullgraph=True, dynamic=DYNAMIC[dynamic], backend=backend)
    if mode == "regional" and getattr(den, "_repeated_blocks", None):
        compile_blocks(den, **kw)
        return den
    if mode in ("regional", "full"):  # no repeated blocks declared: compile it whole
        return torch.compile(den, **kw)
    return den


def compile_blocks(den, **kw) -> int:
    """diffusers' `compile_repeated_blocks`, on each block's `forward` rather than its `__call__`: the
    same graphs, and hooks that replace `forward` later (app.step_cache) wrap the compiled code and
    run eagerly around it instead of being traced into a fullgraph. Returns the blocks compiled."""
    names = set(den._repeated_blocks)
    blocks = [m for m in den.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"no block of the classes {sorted(names)} in {type(den).__name__}")
    for block in blocks:
        block.forward = torch.compile(block.forward, **kw)
    return len(blocks)


def graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process (a job that adds one paid a compile)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _cuda_graphs(pipe, family, recipe):
    from app.cudagraphs import GraphedDenoiser

    setattr(pipe, family.denoiser, GraphedDenoiser(_denoiser(pipe, family)))


STEPS = (
    ("fuse_qkv", lambda r: r.fuse_qkv, _fuse_qkv),
    ("quantize", lambda r: r.quantize != "none", _quantize),
    ("lora", lambda r: r.lora_rank > 0, _lora),  # after quantizing (it wraps FP8Linear), before compiling
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
            if wanted(recipe) and not (tag and name == "lora"):  # per-job LoRA adapts the main denoiser
                t0 = time.perf_counter()
                step(pipe, fam, recipe)
                applied[tag + name] = round((time.perf_counter() - t0) * 1000, 1)
    logger.info("recipe {} applied: {}", recipe.to_dict(), applied)
    return applied


def warmup_plan(family, buckets: list, recipe: Recipe, text_lengths=()) -> list:
    """The warm-up jobs: one per bucket at batch 1, then (when compiled with dynamic shapes) the passes
    after which one graph per block class serves every batch 1-4 and every size, so no job compiles.

    Dynamo specializes a dimension of size 1, and under `auto` marks a dimension dynamic on its first
    recompile. Hence: a batch-1 job at an off-bucket size (`auto`, unless the buckets already differ in
    pixel count) makes the token dimension dynamic at batch 1, and a batch-2 job at another off-bucket
    size makes the batch dimension dynamic (>= 2, which serves 3 and 4 too). `dynamic=off` warms the
    buckets only: a job at another batch or size compiles (seconds) inside the job.
    """
    jobs = list(buckets)
    if recipe.compile == "off" or recipe.dynamic == "off" or not jobs:
        return jobs + _text_warmups(jobs, text_lengths, every=recipe.compile != "off")
    seen = {w.job.width * w.job.height for w in jobs}
    first = jobs[0]
    if recipe.dynamic == "auto" and len(seen) < 2:
        jobs.append(_off_bucket_job(family, first, seen, 1))
    jobs.append(_off_bucket_job(family, first, seen, 2))
    return jobs + _text_warmups(jobs, text_lengths, every=False)


def _text_warmups(jobs: list, lengths, every: bool) -> list:
    """TEXT_BUCKETS: each T5 length but the shortest (a short warm-up prompt's own) once more, at the
    first bucket (dynamic shapes then serve the rest), or at every bucket (`every`: static graphs)."""
    return [w._replace(text_length=n) for n in sorted(lengths)[1:] for w in (jobs if every else jobs[:1])]


def _off_bucket_job(family, warm, seen: set, num_images: int):
    """Warm-up `warm` (a Warmup: job and its input images) at `num_images` and at the nearest size within
    the family's limits whose pixel (so token) count no earlier warm-up job had; adds that count to `seen`."""
    from app.families.base import Warmup

    job, m = warm.job, family.multiple
    for k in range(1, 64):
        for w in (job.width - k * m, job.width + k * m):
            h = job.height
            if family.min_side <= w <= family.max_side and w * h <= family.max_pixels and w * h not in seen:
                seen.add(w * h)  # sides and pixels checked above; the rest of the job is already valid
                return Warmup(job.model_copy(update=dict(width=w, height=h, num_images=num_images)), warm.images)
    raise ValueError(f"no off-bucket size near {job.width}x{job.height} within the {family.name} family's limits")


Shape = tuple  # (width, height, num_images) of a job or a warm-up pass


def first_run_cost(recipe: Recipe, warmed: list, width: int, height: int, num_images: int) -> str:
    """The batch/size rule: what a job pays on its first run after warm-up ran `warmed` (warmup_plan's
    (width, height, num_images), in its order): "none", "compile" (Dynamo traces and Inductor builds a
    graph inside the job: seconds) or "capture" (a CUDA graph recorded in the job: about one step).

    No size snaps to a bucket: a job runs at its own size, on a graph that is either exactly its shape
    or dynamic over it. Dynamo specializes a size-1 batch, so batch 1 and batch 2-4 are two graph
    families. A dimension is dynamic under `all` from the first compile, and under `auto` once it
    took two values (the recompile that sees the second value marks it dynamic). Regional graphs see
    (batch, tokens, channels): tokens follow the pixel count; a full compile may see the latents' sides
    (a UNet), so there width and height each must have varied. `off`: only the warmed shapes exist.
    """
    shape = (width, height, num_images)
    if recipe.compile != "off" and shape not in warmed and not _served(recipe, warmed, shape):
        return "compile"
    if recipe.cuda_graphs and shape not in warmed:
        return "capture"
    return "none"


def _dims(recipe: Recipe, width: int, height: int) -> tuple:
    return (width * height,) if recipe.compile == "regional" else (width, height)


def _served(recipe: Recipe, warmed: list, shape: Shape) -> bool:
    """Whether a graph warm-up left (one per batch family) is dynamic or equal on every dimension of `shape`."""
    if recipe.dynamic == "off":
        return False
    w, h, n = shape
    # batch 1 is compiled from batch-1 passes only; the batch 2-4 graph from a batch >= 2 pass, with every
    # dimension that varied in the passes before it (the order warmup_plan keeps: batch 1 first)
    seen = [s for s in warmed if s[2] == 1] if n == 1 else warmed
    if not seen or (n > 1 and not any(s[2] > 1 for s in warmed)):
        return False
    per_dim = zip(*(_dims(recipe, sw, sh) for sw, sh, _ in seen))
    return all(recipe.dynamic == "all" or len(set(vals)) > 1 or vals[0] == v
               for vals, v in zip(per_dim, _dims(recipe, w, h)))


def warmup(pipe, family, jobs, text=None) -> dict:
    """Run each warm-up job (`warmup_plan`) through the same `generate` a job runs, so encoders and
    compiled graphs are ready; ms per job, keyed WIDTHxHEIGHT (xN for N images, tN for a T5 length)."""
    out = {}
    for job, images, length in jobs:
        t0 = time.perf_counter()
        if text is None:
            family.generate(pipe, job, images=images)
        else:
            family.generate(pipe, job, images=images, text=text.at_length(length))
        name = f"{job.width}x{job.height}" + (f"x{job.num_images}" if job.num_images > 1 else "") + \
            (f"t{length}" if length else "")
        out[name] = round((time.perf_counter() - t0) * 1000, 1)
    logger.info("warm-up: {}", out)
    return out
