"""The optimization recipe, applied in one fixed order, and the warm-up.

Order (each step depends on the ones before it):
  1. dtype          bf16 on GPU (done at load: the pipeline is built or loaded in plan.torch_dtype)
  2. fuse_qkv       fuse Q/K/V projections into one GEMM; must precede quantization, which would
                    otherwise freeze three separate weights (torchao even raises on fusing after)
  3. quantize       `quantize_denoiser` (shared with the bake and the baked loader): FP8 (sm_89+)
                    our FP8Linear on the denoiser's block linears, family skip list kept bf16;
                    INT8 (sm_80/86) torchao dynamic int8 with the same skip list; a no-op when baked;
                    then (`fuse_gelu_quant`, with FP8) FLUX's MLP outputs go to FP8 in one kernel
                    (app.fused: 99.4 -> 94.9 ms/step on the H200)
  4. attention      the kernel chosen per GPU (app.attention)
  5. channels_last  the VAE's convolutions, when measured faster (off by default: see bench)
  6. compile        regional (each repeated block class once: short compile) | full | off
  7. cuda_graphs    the whole denoiser call replayed from one CUDA graph per shape (app.cudagraphs);
                    last, since it records whatever the steps before produced

`choose_recipe(plan, settings, family)` turns the preflight plan into a Recipe; `apply_recipe` loops over
the steps; nothing here reads the environment.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from loguru import logger

from app.fp8 import fits_scaled_mm, swap_linears


@dataclass(frozen=True)
class Recipe:
    fuse_qkv: bool = False
    quantize: str = "none"  # fp8 | int8 | none
    attention: str = "native"  # native | cudnn | flash | fa3 | fa3_fp8
    vae_channels_last: bool = False
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


# Projections made redundant by each fused one (diffusers' `fuse_projections`): self-attention gets
# `to_qkv`, cross-attention (SDXL) only `to_kv` (its `to_q` stays in use), FLUX's text stream `to_added_qkv`.
_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
          "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


@torch.no_grad()
def fuse_qkv(denoiser) -> int:
    """Fuse Q/K/V (and the text stream's) projections; drop the unfused copies; return params freed.

    diffusers' `fuse_qkv_projections()` adds `to_qkv` / `to_added_qkv` but keeps `to_q`, `to_k`,
    `to_v`, ... alive though they are never used again: on FLUX.1-dev that is 2.15 B parameters,
    4.3 GB of dead bf16 weights (and FP8 copies of them if quantized afterwards). Idempotent, and
    works on the meta device (how the loader rebuilds a baked skeleton).
    """
    if not hasattr(denoiser, "fuse_qkv_projections") or \
            any(getattr(m, "fused_projections", False) for m in denoiser.modules()):
        return 0
    denoiser.fuse_qkv_projections()
    freed = 0
    for module in denoiser.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for fused, originals in _FUSED.items():
            if isinstance(getattr(module, fused, None), torch.nn.Module):
                for name in originals:
                    if isinstance(module._modules.get(name), torch.nn.Module):
                        freed += sum(p.numel() for p in module._modules[name].parameters())
                        del module._modules[name]
    return freed


def _is_torchao(tensor) -> bool:
    return type(tensor).__module__.startswith("torchao")


@torch.no_grad()
def quantize_denoiser(denoiser, family, precision: str) -> list[str]:
    """Fuse QKV, then quantize the denoiser's linears in place; return the names quantized.

    The one quantization step of the project: the runtime recipe, `weights bake` (before writing)
    and the baked loader (on the meta skeleton, so its modules match the stored tensors) all call it.
    Which linears: every `nn.Linear` the family does not skip (`Family.skips`: embedders, final
    projection, norm/modulation stay in high precision) whose in/out features are multiples of 16.
      fp8   our `FP8Linear` (row-wise e4m3 weight + fp32 scale, `torch._scaled_mm`); no torchao: its
            Float8Tensor subclass took 224 s of regional compile for 6 FLUX blocks vs 2.1 s for
            FP8Linear at the same step time (bench/results/probe_h100_1.json)
      int8  torchao's Int8DynamicActivationInt8WeightConfig (sm_80/86, where FP8 has no kernel)
      bf16/fp32/none  fuse only
    Idempotent: an already quantized denoiser returns [] and is left unchanged.
    """
    fuse_qkv(denoiser)
    if precision == "fp8":
        return swap_linears(denoiser, keep=family.skips)
    if precision == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        chosen = {n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear) and fits_scaled_mm(m)
                  and not family.skips(n) and not _is_torchao(m.weight)}
        if chosen:
            quantize_(denoiser, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in chosen)
        return sorted(chosen)
    if precision in ("bf16", "fp32", "none"):
        return []
    raise ValueError(f"unknown precision {precision!r} (fp8, int8, bf16 or none)")


def _fuse_qkv(pipe, family, recipe):
    freed = fuse_qkv(_denoiser(pipe, family))
    logger.info("fused QKV projections; dropped {:.2f} B unfused parameters", freed / 1e9)


def _quantize(pipe, family, recipe):
    done = quantize_denoiser(_denoiser(pipe, family), family, recipe.quantize)
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


def _channels_last(pipe, family, recipe):
    if recipe.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last)


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
    ("channels_last", lambda r: r.vae_channels_last, _channels_last),
    ("compile", lambda r: r.compile != "off", _compile),
    ("cuda_graphs", lambda r: r.cuda_graphs, _cuda_graphs),
)


def apply_recipe(pipe, family, recipe: Recipe) -> dict:
    """Apply `recipe` to `pipe` in place, in the documented order; return ms per applied step."""
    applied = {}
    for name, wanted, step in STEPS:
        if wanted(recipe):
            t0 = time.perf_counter()
            step(pipe, family, recipe)
            applied[name] = round((time.perf_counter() - t0) * 1000, 1)
    logger.info("recipe {} applied: {}", recipe.to_dict(), applied)
    return applied


def warmup(pipe, family, defaults, shapes) -> dict:
    """Run every shape bucket once (2 steps) so encoders and compiled graphs are ready; ms per shape.

    A job at a size outside the buckets still runs: with regional compilation it triggers one
    recompile of the two block graphs for that shape (seconds, logged by torch), later jobs at that
    size are fast; past torch._dynamo's recompile limit it runs eager.
    """
    out = {}
    for w, h in shapes:
        t0 = time.perf_counter()
        kw = dict(prompt="warm up", width=w, height=h, num_inference_steps=2, guidance_scale=defaults.guidance,
                  output_type="pil")
        if defaults.max_sequence_length:
            kw["max_sequence_length"] = defaults.max_sequence_length
        with torch.inference_mode():
            pipe(**kw)
        out[f"{w}x{h}"] = round((time.perf_counter() - t0) * 1000, 1)
    logger.info("warm-up: {}", out)
    return out
