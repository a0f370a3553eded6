"""Import a published single-file FP8 FLUX checkpoint into a baked directory.

The importer writes a baked directory directly, in the format `bake` writes (FP8Linear: e4m3
`weight` + fp32 per-row `weight_scale`), with the layer structure decided by the same
`weights.quantize.quantize_denoiser` applied to the meta skeleton, so the loader and the stream treat
it identically. Per layer:
  - published codes with per-tensor or per-channel e4m3 scales -> kept bit for bit: a per-tensor
    scale is the same value on every row, so it is exactly a per-row scale. Key names are mapped
    (flux_keys), row operations apply to the codes as bytes and to their `[out, 1]` scales alike,
    and fused QKV is the concatenation of both (rows keep their own scale).
  - per-block scales or e5m2 codes (granularity or format that is not per-row e4m3), and layers
    the publisher left in high precision -> dequantized exactly in fp32, then re-quantized per row
    (`weights.fp8.quantize_rows`, what `bake` does to a bf16 weight).
  - layers our recipe keeps in high precision (embedders, final projection, norm/modulation)
    -> dequantized (codes x scale) to bf16 if the publisher quantized them.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import torch
from loguru import logger

from weights import formats
from weights import manifest as mf
from weights.bake import RECIPES, BakeSpec
from weights.fp8 import E4M3, FP8Linear, quantize_rows
from weights.errors import UnknownFormat
from weights.load import skeleton
from weights.quantize import FUSED
from weights.serialize import write_denoiser



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
        for fused, parts in FUSED.items():
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


def convert(ckpt: formats.Checkpoint, config: dict, fp8_layers: set[str], flux_keys) -> tuple[dict, int, int]:
    """(state dict for the baked skeleton, FP8 layers kept bit for bit, FP8 layers re-quantized per row).

    `fp8_layers`: the skeleton's FP8Linear module names (what `quantize_denoiser` swapped).
    """
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
    state, kept, requantized = {}, 0, 0
    for name, t in d_values.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in fp8_layers:
            if name in quant:  # per-row e4m3 codes: bit for bit
                state[name], state[f"{module}.weight_scale"] = t.view(E4M3), d_scales[name].to(torch.float32)
                kept += 1
            else:  # high precision in the file (or dequantized per-block/e5m2): re-quantize per row
                state[name], state[f"{module}.weight_scale"] = quantize_rows(t.float())
                requantized += 1
        elif name in quant:
            state[name] = _dequant(t, d_scales[name], True).to(torch.bfloat16)
        else:
            state[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    return state, kept, requantized


def import_checkpoint(src: str | Path, fam: BakeSpec, out: str | Path, config: str | Path | None = None,
                      base: str | Path | None = None) -> dict:
    """Write a baked directory (denoiser only, or a full pipeline with `base`) from `src` for family `fam`."""
    if getattr(fam, "checkpoint_keys", None) is None:
        raise UnknownFormat(f"import does not know the {fam.name} family's checkpoint key names")
    flux_keys = importlib.import_module(fam.checkpoint_keys)
    ckpt = formats.read(src)
    cfg = read_config(config) if config else infer_flux_config(ckpt.plain, ckpt.codes)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / fam.denoiser).mkdir(parents=True)
    (tmp / fam.denoiser / "config.json").write_text(json.dumps(cfg))
    model = skeleton(tmp / fam.denoiser, "fp8", fam.skips, torch.bfloat16)
    fp8_layers = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    state, kept, requantized = convert(ckpt, cfg, fp8_layers, flux_keys)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UnknownFormat(f"{ckpt.format}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}, and has "
                            f"{len(unexpected)} the model does not, e.g. {unexpected[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    write_denoiser(model, tmp / fam.denoiser)
    if base:
        _copy_base(Path(base), tmp, fam)
    logger.info("imported {} ({}): {} FP8 layers kept bit for bit, {} re-quantized per row, scales {}", src,
                ckpt.format, kept, requantized, ckpt.notes)
    manifest = mf.write(tmp, {
        "source": {"id": Path(src).name, "revision": None, "format": ckpt.format,
                   "sha256": mf.file_digest(Path(src))["sha256"], "scales": ckpt.notes},
        "family": fam.name, "denoiser": fam.denoiser, "complete": bool(base),
        "recipe": {"precision": "fp8", "fused_qkv": True, "config": RECIPES["fp8"],
                   "skip": list(fam.quant_skip), "quantized_layers": kept + requantized, "imported": True,
                   "kept_bit_for_bit": kept, "requantized_per_row": requantized},
        "vram_gib": fam.vram_gib.get("fp8"),
    })
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def _copy_base(base: Path, out: Path, fam: BakeSpec) -> None:
    """The other pipeline components and model_index.json from a local diffusers (or baked) directory."""
    if not (base / "model_index.json").is_file():
        raise UnknownFormat(f"--base {base}: not a diffusers pipeline directory (no model_index.json)")
    shutil.copy2(base / "model_index.json", out / "model_index.json")
    for child in base.iterdir():
        if child.is_dir() and child.name != fam.denoiser:
            shutil.copytree(child, out / child.name)
