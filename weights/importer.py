"""Import a published single-file FP8 checkpoint (FLUX, Qwen-Image, Wan...) into a baked directory.

A model with several denoisers is published one file per denoiser (Kijai's Wan 2.2 A14B: a HIGH and a
LOW noise expert); `import high=FILE low=FILE` takes one file per expert key (`weights.experts`), each
checked and converted by the same rules into its own folder (`transformer`, `transformer_2`).

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
from contextlib import ExitStack
from pathlib import Path

import torch
from loguru import logger

from weights import manifest as mf
from weights import outdir
from weights.bake import RECIPES, BakeSpec
from weights.checkpoint import CheckpointFile
from weights.convert import Producer, layout, segments
from weights.errors import UnknownExpert, UnknownFormat
from weights.experts import assign, key_of, split
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


def import_checkpoint(src, fam: BakeSpec, out: str | Path, config: str | Path | None = None,
                      base: str | Path | None = None, keys=None) -> dict:
    """Write a baked directory (the denoisers only, or a full pipeline with `base`) for family `fam` from
    `src`: one file (the main denoiser's), or `[EXPERT=]FILE` arguments, one file per denoiser (Wan 2.2
    A14B: `high=` -> transformer, `low=` -> transformer_2; `weights.experts`). Every file is checked
    before anything is written."""
    keys = key_module(fam, keys)
    outdir.check(out)
    if base and not (Path(base) / "model_index.json").is_file():
        raise UnknownFormat(f"--base {base}: not a diffusers pipeline directory (no model_index.json)")
    files = _assign(src, fam, base)
    with ExitStack() as stack:
        parts = {name: _prepare(stack.enter_context(CheckpointFile(path)), fam, keys, config)
                 for name, (_, path) in files.items()}
        with outdir.staged(out) as tmp:
            for name, (cfg, model, plan, produce, expected) in parts.items():
                folder = tmp / name
                folder.mkdir()
                model.save_config(folder)
                write_streamed(folder, [(n, *expected[n]) for n in produce.order()], produce)
                logger.info("imported {} -> {} ({}): {} FP8 layers kept bit for bit, {} re-quantized per row, "
                            "scales {}", files[name][1], name, plan.format, produce.kept, produce.requantized,
                            dict(plan.notes))
            if base:
                _copy_base(Path(base), tmp, set(files))
            return mf.write(tmp, _manifest(fam, files, parts, bool(base)))


def _assign(src, fam: BakeSpec, base) -> dict[str, tuple[str | None, str]]:
    """{denoiser: (expert key, file)}: the main denoiser always; with `base`, every denoiser it holds."""
    specs = [str(src)] if isinstance(src, (str, Path)) else [str(s) for s in src]
    every = (fam.denoiser, *getattr(fam, "extra_denoisers", ()))
    if base:
        present = base_denoisers(Path(base), every)
    elif all(split(s)[0] is None for s in specs):
        present = [fam.denoiser]  # a bare file: the main denoiser (a model of one)
    else:
        present = list(every)
    files = assign(specs, fam, present, "import")
    missing = [n for n in (present if base else [fam.denoiser]) if n not in files]
    if missing:
        what = ", ".join(f"{n} (expert {key_of(fam, n)!r})" if key_of(fam, n) else n for n in missing)
        where = f"--base {base} holds" if base else "an import needs the main denoiser,"
        raise UnknownExpert(f"import: no file for {what}: {where} it; give "
                            + " ".join(f"{key_of(fam, n) or 'FILE'}=FILE" for n in missing))
    return files


def base_denoisers(base: Path, names) -> list[str]:
    """Which of the denoisers `names` the base pipeline's model_index.json holds (a null entry: none)."""
    try:
        index = json.loads((base / "model_index.json").read_text())
    except (OSError, ValueError):
        raise UnknownFormat(f"--base {base}: model_index.json is not valid JSON") from None
    return [n for n in names if isinstance(index.get(n), list) and index[n] and index[n][0] is not None]


def _prepare(ckpt: CheckpointFile, fam: BakeSpec, keys, config):
    """(config, FP8 skeleton, plan, producer, expected tensors) for one file, after every check; the
    refusals that come without a tensor name the file."""
    plan = read_plan(ckpt)
    shapes = {k: s.stored.shape for k, s in plan.sources.items()}
    try:
        cfg, model = _skeleton(read_config(config) if config else keys.infer_config(shapes), keys, fam)
    except UnknownFormat as e:
        raise type(e)(e.message if str(ckpt.path) in e.message else f"{ckpt.path}: {e.message}") from None
    fp8_layers = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    segs = layout(expected, segments(keys.entries(sorted(plan.sources), cfg), ckpt, plan), ckpt, plan)
    return cfg, model, plan, Producer(ckpt, plan, segs, expected, fp8_layers), expected


def _manifest(fam: BakeSpec, files: dict, parts: dict, complete: bool) -> dict:
    """The manifest body: the main denoiser's source as `source`, every file's under `sources` when several."""
    def source(name):
        plan, path = parts[name][2], Path(files[name][1])
        return {"id": path.name, "revision": None, "format": plan.format,
                "sha256": mf.file_digest(path)["sha256"], "scales": dict(plan.notes)}

    names = list(parts)
    kept = {n: parts[n][3].kept for n in names}
    requantized = {n: parts[n][3].requantized for n in names}
    several = len(names) > 1
    return {
        "source": source(fam.denoiser),
        **({"sources": {n: {**source(n), "expert": files[n][0]} for n in names}} if several else {}),
        "family": fam.name, "denoiser": fam.denoiser, "complete": complete,
        **({"extra_denoisers": names[1:]} if several else {}),
        "recipe": {"precision": "fp8", "fused_qkv": fam.fuse_qkv, "config": RECIPES["fp8"],
                   "skip": list(fam.quant_skip), "quantized_layers": sum(kept.values()) + sum(requantized.values()),
                   "imported": True, "kept_bit_for_bit": sum(kept.values()),
                   "requantized_per_row": sum(requantized.values()),
                   **({"quantized_by_denoiser": {n: kept[n] + requantized[n] for n in names}} if several else {})},
        "vram_gib": fam.vram_gib.get("fp8"),
    }


def _copy_base(base: Path, out: Path, denoisers: set[str]) -> None:
    """The other pipeline components and model_index.json from a local diffusers (or baked) directory."""
    shutil.copy2(base / "model_index.json", out / "model_index.json")
    for child in base.iterdir():
        if child.is_dir() and child.name not in denoisers:
            shutil.copytree(child, out / child.name)
