"""Bake: a diffusers pipeline in, a baked directory out (denoiser pre-quantized, manifest written).

Every component except the denoiser is written by its own `save_pretrained` (bf16); the denoiser (and
each further one the pipeline holds: Wan 2.2 A14B's low-noise expert `transformer_2`) goes through
`weights.quantize.quantize_denoiser` (the runtime recipe's own step: fused QKV, then `FP8Linear` per row on the block linears, the family's skip list kept) and `serialize.write_denoiser`
(its state_dict as plain safetensors shards). Quantizing is the same arithmetic on a CPU build machine
and on a GPU (`weights.fp8.quantize_rows`). `--out` follows `weights.outdir`'s rule (absent, empty
or a previous bake; written beside it and swapped in when complete; nothing else is ever deleted). Which model to bake (a hub id, a folder, an embedded tiny
model) is resolved by the caller, `python -m weights bake`, from the worker's model families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from loguru import logger

from weights import manifest as mf
from weights import outdir, text_fp8
from weights.quantize import quantize_denoiser
from weights.serialize import write_denoiser

# What each precision's baked denoiser holds, recorded in the manifest.
RECIPES = {"fp8": "fp8-rowwise FP8Linear (e4m3 weight, fp32 per-row weight_scale, torch._scaled_mm)",
           "int8": "torchao Int8DynamicActivationInt8WeightConfig (torchao safetensors layout)",
           "bf16": "bf16, QKV fused"}


class BakeSpec(Protocol):
    """What a bake needs to know of a model family (app.families.Family provides it)."""

    name: str
    denoiser: str  # the pipeline attribute holding the transformer / UNet
    extra_denoisers: tuple[str, ...]  # further denoisers baked the same way (Wan 2.2 A14B's transformer_2)
    quant_skip: tuple[str, ...]  # regexes of denoiser modules kept in high precision
    fuse_qkv: bool  # whether its attention runs diffusers' fused Q/K/V projections
    vram_gib: dict

    def skips(self, module_name: str) -> bool: ...


def save_components(pipe, denoisers: tuple[str, ...], out: Path) -> None:
    """Every pipeline component but the denoisers, and model_index.json."""
    for name, component in pipe.components.items():
        if component is None or name in denoisers:
            continue
        component.save_pretrained(out / name)
    pipe.save_config(out)


def bake_pipeline(pipe, family: BakeSpec, out: str | Path, precision: str, source: dict,
                  device: str | None = None, extra: dict | None = None, text_encoders: str = "bf16") -> dict:
    """Write a baked directory at `out` from an in-memory pipeline (consumed); return its manifest.
    `extra` joins the manifest (a fused LoRA's record, the bake's own defaults). `text_encoders="fp8"`
    stores the text encoders' repeated-layer linears as FP8 too (weights.text_fp8)."""
    if precision not in RECIPES:
        raise ValueError(f"unknown precision {precision!r} (one of {', '.join(RECIPES)})")
    if text_encoders not in ("bf16", "fp8"):
        raise ValueError(f"text encoders are baked fp8 or bf16, not {text_encoders!r}")
    outdir.check(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # the pipeline's denoisers: the family's main one, then any further one this checkpoint has (a Wan 2.2
    # A14B pipeline holds two experts, a Wan 2.1 one leaves transformer_2 None)
    extra_names = getattr(family, "extra_denoisers", ())
    names = (family.denoiser, *(n for n in extra_names if getattr(pipe, n, None) is not None))
    quantized: dict[str, int] = {}
    with outdir.staged(out) as tmp:
        for name in names:  # one at a time: each is freed before the next is quantized
            denoiser = getattr(pipe, name).to(device)
            quantized[name] = len(quantize_denoiser(denoiser, precision, family.skips, fuse=family.fuse_qkv))
            logger.info("baking {} -> {}: {} ({} linears quantized to {})", source.get("id"), out, name,
                        quantized[name], precision)
            write_denoiser(denoiser, tmp / name)
            setattr(pipe, name, None)  # free it before the next denoiser or the other components
            del denoiser
        encoders = text_fp8.quantize_encoders(pipe) if text_encoders == "fp8" else {}
        save_components(pipe, names, tmp)
        text_fp8.write_scales(pipe, encoders, tmp)
        return mf.write(tmp, {
            "source": source,
            "family": family.name,
            "denoiser": family.denoiser,
            **({"extra_denoisers": list(names[1:])} if names[1:] else {}),
            "recipe": {"precision": precision, "fused_qkv": family.fuse_qkv, "config": RECIPES[precision],
                       "skip": list(family.quant_skip), "quantized_layers": sum(quantized.values()),
                       **({"quantized_by_denoiser": quantized} if names[1:] else {})},
            "vram_gib": family.vram_gib.get(precision),
            **({"text_encoders": {"precision": "fp8", "config": RECIPES["fp8"], "layers": encoders}}
               if encoders else {}),
            **(extra or {}),
        })
