"""Import a published single-file FP8 FLUX checkpoint into a baked directory.

The FP8 codes are kept bit for bit: key names are mapped (flux_keys), row operations are applied to
the codes as bytes and to their `[out, 1]` scales alike, and fused QKV is the concatenation of
both. Layers our recipe keeps in high precision (embedders, final projection, norm/modulation) are
dequantized (codes x scale) to bf16 if the publisher quantized them. The result is the same
structure `bake` writes, so the loader and the stream treat it identically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from loguru import logger

from app.families import FAMILIES, Family
from weights import flux_keys, formats
from weights import manifest as mf
from weights.errors import UnknownFormat
from weights.load import skeleton
from weights.quantize import fp8_weight, quant_config
from weights.serialize import write_denoiser

# (fused module, its parts) inside an attention module, as diffusers' fuse_projections builds them.
_FUSE = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))


def infer_flux_config(plain: dict, codes: dict) -> dict:
    """A FluxTransformer2DModel config from BFL key names and shapes."""
    shape = {k: tuple(v.shape) for k, v in {**plain, **codes}.items()}
    try:
        inner, in_ch = shape["img_in.weight"]
        head = shape["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        config = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": in_ch,
                  "num_layers": 1 + max(int(k.split(".")[1]) for k in shape if k.startswith("double_blocks.")),
                  "num_single_layers": 1 + max(int(k.split(".")[1]) for k in shape if k.startswith("single_blocks.")),
                  "attention_head_dim": head, "num_attention_heads": inner // head,
                  "joint_attention_dim": shape["txt_in.weight"][1],
                  "pooled_projection_dim": shape["vector_in.in_layer.weight"][1],
                  "guidance_embeds": "guidance_in.in_layer.weight" in shape}
    except (KeyError, ValueError):
        raise UnknownFormat("not a FLUX transformer checkpoint (BFL key names expected: img_in, double_blocks...)") from None
    if head != 128:
        raise UnknownFormat(f"head dim {head} is not FLUX.1's 128: pass --config with the transformer's config.json")
    return {**config, "axes_dims_rope": [16, 56, 56]}


def read_config(path: str | Path) -> dict:
    p = Path(path)
    for candidate in (p, p / "config.json", p / "transformer" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no config.json at {path}")


def _fuse(values: dict, scales: dict, quant: set) -> None:
    """Concatenate to_q/k/v (and the added ones) into the fused projections, codes and scales alike."""
    prefixes = {k.rsplit(".", 2)[0] for k in values if k.endswith(".to_q.weight")}
    for attn in sorted(prefixes):
        for fused, parts in _FUSE:
            names = [f"{attn}.{p}.weight" for p in parts]
            if not all(n in values for n in names):
                continue
            if all(n in quant for n in names):
                values[f"{attn}.{fused}.weight"] = torch.cat([values.pop(n) for n in names])
                scales[f"{attn}.{fused}.weight"] = torch.cat([scales.pop(n) for n in names])
                quant.add(f"{attn}.{fused}.weight")
            else:  # mixed precision parts: one dtype for the fused layer, dequantized
                values[f"{attn}.{fused}.weight"] = torch.cat([_dequant(values.pop(n), scales.pop(n, None), n in quant)
                                                              for n in names])
            quant.difference_update(names)
            values[f"{attn}.{fused}.bias"] = torch.cat([values.pop(f"{attn}.{p}.bias") for p in parts])


def _dequant(t: torch.Tensor, scale, is_codes: bool) -> torch.Tensor:
    if not is_codes:
        return t.to(torch.float32)
    return t.view(torch.float8_e4m3fn).to(torch.float32) * scale


def convert(ckpt: formats.Checkpoint, config: dict, family: Family) -> tuple[dict, int]:
    """(diffusers state dict for the fused skeleton, number of FP8 layers kept as FP8)."""
    values = {**ckpt.plain, **{k: c.view(torch.uint8) for k, c in ckpt.codes.items()}}  # codes as bytes
    try:
        d_values = flux_keys.to_diffusers(values, config)
        d_scales = flux_keys.to_diffusers({k: ckpt.row_scales.get(k, v) for k, v in values.items()}, config)
    except KeyError as e:
        raise UnknownFormat(f"{ckpt.format}: key names do not match a FLUX transformer of this config: {e}") from None
    source = {d: b for d, b, _ in flux_keys.table(config)}
    quant = {d for d in d_values if source[d] in ckpt.codes}
    d_scales = {d: s for d, s in d_scales.items() if d in quant}
    _fuse(d_values, d_scales, quant)
    state, kept = {}, 0
    for name, t in d_values.items():
        module = name.removesuffix(".weight")
        if name in quant and not family.skips(module) and t.shape[0] % 16 == 0 and t.shape[1] % 16 == 0:
            state[name] = fp8_weight(t.view(torch.float8_e4m3fn), d_scales[name])
            kept += 1
        elif name in quant:
            state[name] = _dequant(t, d_scales[name], True).to(torch.bfloat16)
        else:
            state[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    return state, kept


def import_checkpoint(src: str | Path, family: str, out: str | Path, config: str | Path | None = None,
                      base: str | Path | None = None) -> dict:
    """Write a baked directory (denoiser only, or a full pipeline with `base`) from `src`."""
    fam = FAMILIES.get(family)
    if fam is None or fam.name != "flux":
        raise UnknownFormat(f"import supports the flux family only, not {family!r}")
    ckpt = formats.read(src)
    cfg = read_config(config) if config else infer_flux_config(ckpt.plain, ckpt.codes)
    state, kept = convert(ckpt, cfg, fam)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / fam.denoiser).mkdir(parents=True)
    (tmp / fam.denoiser / "config.json").write_text(json.dumps(cfg))
    model = skeleton(tmp / fam.denoiser, fused=True)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise UnknownFormat(f"{ckpt.format}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    write_denoiser(model, tmp / fam.denoiser)
    if base:
        _copy_base(Path(base), tmp, fam)
    logger.info("imported {} ({}): {} FP8 layers kept bit for bit, scales {}", src, ckpt.format, kept, ckpt.notes)
    manifest = mf.write(tmp, {
        "source": {"id": Path(src).name, "revision": None, "format": ckpt.format,
                   "sha256": mf.file_digest(Path(src))["sha256"], "scales": ckpt.notes},
        "family": fam.name, "denoiser": fam.denoiser, "complete": bool(base),
        "recipe": {"precision": "fp8", "fused_qkv": True, "config": repr(quant_config("fp8")),
                   "skip": list(fam.quant_skip), "quantized_layers": kept, "imported": True},
        "vram_gib": fam.vram_gib.get("fp8"),
    })
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def _copy_base(base: Path, out: Path, fam: Family) -> None:
    """The other pipeline components and model_index.json from a local diffusers (or baked) directory."""
    if not (base / "model_index.json").is_file():
        raise UnknownFormat(f"--base {base}: not a diffusers pipeline directory (no model_index.json)")
    shutil.copy2(base / "model_index.json", out / "model_index.json")
    for child in base.iterdir():
        if child.is_dir() and child.name != fam.denoiser:
            shutil.copytree(child, out / child.name)
