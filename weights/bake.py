"""Bake: a diffusers pipeline in, a baked directory out (denoiser pre-quantized, manifest written).

The source is `tiny-flux`/`tiny-sdxl` (built in code), a local diffusers directory, or a Hugging
Face id (downloaded with huggingface_hub). Every component except the denoiser is written by its
own `save_pretrained` (bf16); the denoiser goes through `app.optimize.quantize_denoiser` (the
runtime recipe's own step: fused QKV, then `FP8Linear` per-row on the block linears) and
`serialize.write_denoiser` (its state_dict as plain safetensors shards). Quantizing is the same
arithmetic on a CPU build machine and on a GPU (`app.fp8.quantize_rows`: amax, divide, cast).
The output appears atomically: it is written to `OUT.partial` and renamed when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from loguru import logger

from app.families import Family
from app.optimize import quantize_denoiser
from app.pipeline import resolve_model
from weights import manifest as mf
from weights.serialize import write_denoiser


# What each precision's baked denoiser holds, recorded in the manifest.
RECIPES = {"fp8": "fp8-rowwise FP8Linear (e4m3 weight, fp32 per-row weight_scale, torch._scaled_mm)",
           "int8": "torchao Int8DynamicActivationInt8WeightConfig (torchao safetensors layout)",
           "bf16": "bf16, QKV fused"}


def load_source(model: str, revision: str | None = None, offline: bool = False):
    """(pipeline in bf16 on the CPU, family, source description) for a MODEL value."""
    family, local = resolve_model(model, revision, offline)
    if model.startswith("tiny-"):
        return family.tiny().to(torch.bfloat16), family, {"id": model, "revision": None}
    import diffusers

    cls = getattr(diffusers, family.pipeline_class)
    pipe = cls.from_pretrained(local or model, revision=revision, torch_dtype=torch.bfloat16,
                               local_files_only=offline)
    return pipe, family, {"id": model, "revision": revision if local is None else None}


def save_components(pipe, family: Family, out: Path) -> None:
    """Every pipeline component but the denoiser, and model_index.json."""
    for name, component in pipe.components.items():
        if component is None or name == family.denoiser:
            continue
        component.save_pretrained(out / name)
    pipe.save_config(out)


def bake(model: str, out: str | Path, precision: str = "fp8", revision: str | None = None,
         offline: bool = False, device: str | None = None) -> dict:
    """Write a baked directory at `out` for a MODEL value; return its manifest."""
    if precision not in RECIPES:
        raise ValueError(f"unknown precision {precision!r} (one of {', '.join(RECIPES)})")
    pipe, family, source = load_source(model, revision, offline)
    return bake_pipeline(pipe, family, out, precision, source, device)


def bake_pipeline(pipe, family: Family, out: str | Path, precision: str, source: dict,
                  device: str | None = None) -> dict:
    """Write a baked directory at `out` from an in-memory pipeline (consumed); return its manifest."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    denoiser = getattr(pipe, family.denoiser).to(device)
    quantized = quantize_denoiser(denoiser, family, precision)
    logger.info("baking {} -> {} ({} linears quantized to {})", source.get("id"), out, len(quantized), precision)
    tmp.mkdir(parents=True)
    write_denoiser(denoiser, tmp / family.denoiser)
    setattr(pipe, family.denoiser, None)  # free it before the other components are written
    del denoiser
    save_components(pipe, family, tmp)
    manifest = mf.write(tmp, {
        "source": source,
        "family": family.name,
        "denoiser": family.denoiser,
        "recipe": {"precision": precision, "fused_qkv": True, "config": RECIPES[precision],
                   "skip": list(family.quant_skip), "quantized_layers": len(quantized)},
        "vram_gib": family.vram_gib.get(precision),
    })
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest
