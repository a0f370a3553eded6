"""The optimization recipe, applied in one fixed order, and the warm-up.

Order (each step depends on the ones before it):
  1. dtype          bf16 on GPU (done at load: the pipeline is built or loaded in plan.torch_dtype)
  2. fuse_qkv       fuse Q/K/V projections into one GEMM; must precede quantization, which would
                    otherwise freeze three separate weights (torchao even raises on fusing after)
  3. quantize       FP8 (sm_89+): our FP8Linear on the denoiser's block linears, family skip list
                    kept bf16; INT8 (sm_80/86): torchao dynamic int8 with the same skip list
  4. attention      the kernel chosen per GPU (app.attention)
  5. channels_last  the VAE's convolutions, when measured faster (off by default: see bench)
  6. compile        regional (each repeated block class once: short compile) | full | off

`choose_recipe(plan, settings)` turns the preflight plan into a Recipe; `apply_recipe` loops over
the steps; nothing here reads the environment.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from loguru import logger

from app.fp8 import swap_linears


@dataclass(frozen=True)
class Recipe:
    fuse_qkv: bool = False
    quantize: str = "none"  # fp8 | int8 | none
    attention: str = "native"  # native | cudnn | flash | fa3
    vae_channels_last: bool = False
    compile: str = "off"  # regional | full | off

    def to_dict(self) -> dict:
        return asdict(self)


def choose_recipe(plan, settings) -> Recipe:
    """The recipe for a plan: everything on a CUDA GPU, nothing on the CPU (the tiny reference path)."""
    if plan.device != "cuda":
        return Recipe()
    quant = plan.precision if plan.precision in ("fp8", "int8") else "none"
    attention = settings.attention if settings.attention != "auto" else ("fa3" if plan.capability == (9, 0) else "cudnn")
    return Recipe(fuse_qkv=True, quantize=quant, attention=attention, compile=settings.compile)


def _denoiser(pipe, family):
    return getattr(pipe, family.denoiser)


# fused module -> the unfused projections it replaces (cross-attention fuses only K and V: `to_q`
# stays in use there, as the SDXL UNet's attn2 shows).
_REPLACES = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def fuse_qkv(denoiser) -> int:
    """Fuse Q/K/V (and the text stream's) projections; drop the unfused copies; return params freed.

    diffusers' `fuse_qkv_projections()` adds `to_qkv` / `to_kv` / `to_added_qkv` but keeps the
    projections they replace alive though they are never used again: on FLUX.1-dev that is 2.15 B
    parameters, 4.3 GB of dead bf16 weights (and FP8 copies of them if quantized afterwards).
    """
    if not hasattr(denoiser, "fuse_qkv_projections") or any(
            hasattr(m, fused) for m in denoiser.modules() for fused in _REPLACES):
        return 0
    denoiser.fuse_qkv_projections()
    freed = 0
    for module in denoiser.modules():
        for fused, replaced in _REPLACES.items():
            if isinstance(getattr(module, fused, None), torch.nn.Module):
                for name in replaced:
                    if isinstance(getattr(module, name, None), torch.nn.Module):
                        freed += sum(p.numel() for p in getattr(module, name).parameters())
                        delattr(module, name)
    return freed


def _fuse_qkv(pipe, family, recipe):
    freed = fuse_qkv(_denoiser(pipe, family))
    logger.info("fused QKV projections; dropped {:.2f} B unfused parameters", freed / 1e9)


def _quantize(pipe, family, recipe):
    den = _denoiser(pipe, family)
    if recipe.quantize == "fp8":
        swapped = swap_linears(den, keep=family.skips)
        logger.info("fp8: {} linears quantized, skip list kept in bf16", len(swapped))
    elif recipe.quantize == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(den, Int8DynamicActivationInt8WeightConfig(),
                  filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and not family.skips(name))


def _attention(pipe, family, recipe):
    from app.attention import set_attention

    if recipe.attention != "native":
        set_attention(_denoiser(pipe, family), recipe.attention)


def _channels_last(pipe, family, recipe):
    if recipe.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last)


def _compile(pipe, family, recipe):
    den = _denoiser(pipe, family)
    if recipe.compile == "regional" and getattr(den, "_repeated_blocks", None):
        den.compile_repeated_blocks(fullgraph=True, dynamic=False)
    elif recipe.compile in ("regional", "full"):  # no repeated blocks declared: compile it whole
        setattr(pipe, family.denoiser, torch.compile(den, fullgraph=True, dynamic=False))


STEPS = (
    ("fuse_qkv", lambda r: r.fuse_qkv, _fuse_qkv),
    ("quantize", lambda r: r.quantize != "none", _quantize),
    ("attention", lambda r: r.attention != "native", _attention),
    ("channels_last", lambda r: r.vae_channels_last, _channels_last),
    ("compile", lambda r: r.compile != "off", _compile),
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
