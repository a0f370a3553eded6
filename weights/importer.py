"""Import a published single-file FP8 checkpoint (FLUX, Qwen-Image, Wan...) into a baked directory.

The family's key module (`Family.checkpoint_keys`, e.g. `weights.flux_keys`) gives the diffusers class,
the map from the file's key names to diffusers' and the config inferred from shapes. The importer
writes a baked directory directly, in the format `bake` writes (FP8Linear: e4m3 `weight` + fp32
per-row `weight_scale`), its structure from the same `quantize_denoiser` applied to the meta
skeleton, so the loader and the stream treat it identically. In order, before anything is written:
`--out` checked (`weights.outdir`), header bounded and every byte range checked, scales and codes
checked and every float tensor read once (`weights.formats`), geometry checked against the config
(`weights.convert.layout`). Then the denoiser is written tensor by tensor, a piece of rows at a time
(`weights.convert.Producer`), into a temporary sibling of `--out` that replaces it when complete, so
host memory holds one piece (plus the small scales), not the model. Per layer:
  - e4m3 codes with per-tensor or per-channel scales (or a plain cast's, scale 1) -> kept bit for bit;
  - per-block scales, e5m2 / fnuz codes, layers published in high precision -> decoded exactly in
    fp32, re-quantized per row (`weights.fp8.quantize_rows`, what `bake` does);
  - layers our recipe keeps in high precision (embedders, final projection, norm/modulation) ->
    decoded (codes x scale) to bf16.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import torch
from loguru import logger

from weights import manifest as mf
from weights import outdir
from weights.bake import RECIPES, BakeSpec
from weights.checkpoint import CheckpointFile
from weights.convert import Producer, layout, segments
from weights.errors import UnknownFormat
from weights.formats import read_plan
from weights.fp8 import FP8Linear
from weights.load import build_skeleton
from weights.serialize import write_streamed


def read_config(path: str | Path) -> dict:
    p = Path(path)
    for candidate in (p, p / "config.json", p / "transformer" / "config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except (ValueError, UnicodeDecodeError):
                raise UnknownFormat(f"--config {candidate}: not valid JSON") from None
            if not isinstance(config, dict):
                raise UnknownFormat(f"--config {candidate}: not a JSON object")
            return config
    raise UnknownFormat(f"--config {path}: no config.json there")


def key_module(fam: BakeSpec, keys=None):
    """The key module: `keys` (a module or its name), else the family's `checkpoint_keys`."""
    keys = keys or getattr(fam, "checkpoint_keys", None)
    if keys is None:
        raise UnknownFormat(f"import does not know the {fam.name} family's checkpoint key names")
    return importlib.import_module(keys) if isinstance(keys, str) else keys


def _skeleton(cfg: dict, keys, fam: BakeSpec):
    if cfg.get("_class_name", keys.CLASS_NAME) != keys.CLASS_NAME:
        raise UnknownFormat(f"--config is a {cfg.get('_class_name')}, this key map is for {keys.CLASS_NAME}")
    cfg = {**cfg, "_class_name": keys.CLASS_NAME}
    try:
        return cfg, build_skeleton(cfg, "fp8", fam.skips, torch.bfloat16, fam.fuse_qkv)
    except Exception as e:  # diffusers raises anything on a config it cannot build
        raise UnknownFormat(f"config cannot build a {keys.CLASS_NAME}: {type(e).__name__}: {str(e)[:200]}") from None


def import_checkpoint(src: str | Path, fam: BakeSpec, out: str | Path, config: str | Path | None = None,
                      base: str | Path | None = None, keys=None) -> dict:
    """Write a baked directory (denoiser only, or a full pipeline with `base`) from `src` for family `fam`."""
    keys = key_module(fam, keys)
    outdir.check(out)
    if base and not (Path(base) / "model_index.json").is_file():
        raise UnknownFormat(f"--base {base}: not a diffusers pipeline directory (no model_index.json)")
    with CheckpointFile(src) as ckpt:
        plan = read_plan(ckpt)
        shapes = {k: s.stored.shape for k, s in plan.sources.items()}
        cfg, model = _skeleton(read_config(config) if config else keys.infer_config(shapes), keys, fam)
        fp8_layers = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
        expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
        segs = layout(expected, segments(keys.entries(sorted(plan.sources), cfg), ckpt, plan), ckpt, plan)
        produce = Producer(ckpt, plan, segs, expected, fp8_layers)
        with outdir.staged(out) as tmp:
            folder = tmp / fam.denoiser
            folder.mkdir()
            model.save_config(folder)
            write_streamed(folder, [(n, *expected[n]) for n in produce.order()], produce)
            if base:
                _copy_base(Path(base), tmp, fam)
            logger.info("imported {} ({}): {} FP8 layers kept bit for bit, {} re-quantized per row, scales {}",
                        src, plan.format, produce.kept, produce.requantized, dict(plan.notes))
            manifest = mf.write(tmp, {
                "source": {"id": Path(src).name, "revision": None, "format": plan.format,
                           "sha256": mf.file_digest(Path(src))["sha256"], "scales": dict(plan.notes)},
                "family": fam.name, "denoiser": fam.denoiser, "complete": bool(base),
                "recipe": {"precision": "fp8", "fused_qkv": fam.fuse_qkv, "config": RECIPES["fp8"],
                           "skip": list(fam.quant_skip), "quantized_layers": produce.kept + produce.requantized,
                           "imported": True, "kept_bit_for_bit": produce.kept,
                           "requantized_per_row": produce.requantized},
                "vram_gib": fam.vram_gib.get("fp8"),
            })
    return manifest


def _copy_base(base: Path, out: Path, fam: BakeSpec) -> None:
    """The other pipeline components and model_index.json from a local diffusers (or baked) directory."""
    shutil.copy2(base / "model_index.json", out / "model_index.json")
    for child in base.iterdir():
        if child.is_dir() and child.name != fam.denoiser:
            shutil.copytree(child, out / child.name)
