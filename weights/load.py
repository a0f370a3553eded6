"""Load a baked directory: denoiser skeleton on the meta device, quantized tensors straight in.

No bf16 copy of a quantized weight ever exists and nothing is re-quantized: safetensors puts each
stored tensor (FP8 codes, float32 scales, bf16 norms) on the target device, torchao's unflatten
rebuilds the `Float8Tensor`s around them, and `load_state_dict(assign=True)` swaps them in for the
meta parameters. Host RAM holds at most one tensor at a time, VRAM the FP8 size.
The other components (VAE, text encoders) are ordinary diffusers folders, loaded by the pipeline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from loguru import logger

from app.families import FAMILIES, Family
from app.plan import Plan
from weights import manifest as mf
from weights.errors import IntegrityError
from weights.quantize import fuse_qkv, is_quantized
from weights.serialize import read_local, shard_names, unflatten

Shard = tuple[str, dict, dict]  # (name, tensors, safetensors metadata)


def skeleton(folder: Path, fused: bool):
    """The denoiser built from its config.json with every parameter on the meta device."""
    import diffusers
    from accelerate import init_empty_weights

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    with init_empty_weights():
        model = cls.from_config(config)
        if fused:
            fuse_qkv(model)  # the baked structure: fused projections, unfused copies gone
    return model


def _place(t: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Move to `device`; plain floating tensors also to the plan's dtype (quantized ones keep theirs)."""
    if is_quantized(t):
        return t.to(device)
    if t.is_floating_point() and t.dtype.itemsize > 1:
        return t.to(device=device, dtype=dtype)
    return t.to(device)


def fill(model, shards: Iterable[Shard], device: str, dtype: torch.dtype):
    """Assign every shard's tensors to `model`; refuse unknown, duplicate or missing tensors."""
    expected = set(model.state_dict().keys())
    seen: set[str] = set()
    for name, tensors, metadata in shards:
        state = {k: _place(v, device, dtype) for k, v in unflatten(tensors, metadata, name).items()}
        unknown = sorted(set(state) - expected)
        if unknown:
            raise IntegrityError(f"{name}: tensors the model does not have: {unknown[:3]}")
        dup = sorted(seen & set(state))
        if dup:
            raise IntegrityError(f"{name}: tensors already loaded from another shard: {dup[:3]}")
        model.load_state_dict(state, strict=False, assign=True)
        seen |= set(state)
    missing = sorted(expected - seen)
    if missing:
        raise IntegrityError(f"baked denoiser lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.eval().requires_grad_(False)


def local_shards(folder: Path, device: str) -> Iterator[Shard]:
    for name in shard_names(folder):
        tensors, metadata = read_local(folder / name, device)
        yield f"{folder.name}/{name}", tensors, metadata


def load_denoiser(root: Path, manifest: dict, plan: Plan, shards: Iterable[Shard] | None = None):
    """The baked denoiser on plan.device; `shards` defaults to the local files."""
    folder = Path(root) / manifest["denoiser"]
    model = skeleton(folder, manifest["recipe"].get("fused_qkv", False))
    device = _device(plan)
    return fill(model, shards if shards is not None else local_shards(folder, device), device, plan.torch_dtype)


def assemble(root: Path, manifest: dict, plan: Plan, denoiser):
    """The full pipeline: the given denoiser plus every other component read from `root`."""
    import diffusers

    family = family_of(manifest)
    cls = getattr(diffusers, family.pipeline_class)
    pipe = cls.from_pretrained(str(root), torch_dtype=plan.torch_dtype, **{family.denoiser: denoiser})
    return pipe.to(plan.device)


def load_baked(path: str | Path, plan: Plan):
    """A ready pipeline from a baked directory (sizes checked; `python -m weights verify` hashes)."""
    root = Path(path)
    manifest = mf.read(root)
    _check_plan(manifest, plan)
    # Sizes only: hashing 12 GB costs seconds on every cold start, and a baked image is immutable;
    # full hashes are `python -m weights verify` (build time) and the S3 stream (every byte).
    mf.check_sizes(root, manifest)
    t0 = time.perf_counter()
    denoiser = load_denoiser(root, manifest, plan)
    secs = time.perf_counter() - t0
    nbytes = sum(i["size"] for n, i in manifest["files"].items() if n.startswith(manifest["denoiser"] + "/"))
    logger.info("baked denoiser: {:.2f} GB in {:.2f} s ({:.2f} GB/s)", nbytes / 1e9, secs, nbytes / 1e9 / max(secs, 1e-9))
    return assemble(root, manifest, plan, denoiser)


def family_of(manifest: dict) -> Family:
    try:
        return FAMILIES[manifest["family"]]
    except KeyError:
        raise IntegrityError(f"manifest names unknown family {manifest.get('family')!r}") from None


def _device(plan: Plan) -> str:
    return "cuda:0" if plan.device == "cuda" else plan.device


def _check_plan(manifest: dict, plan: Plan) -> None:
    """Refuse a baked precision this plan cannot run, instead of failing at the first job."""
    baked = manifest["recipe"]["precision"]
    if baked == "fp8" and plan.device == "cuda" and plan.capability and plan.capability < (8, 9):
        raise IntegrityError(f"baked FP8 weights need compute capability 8.9+, this GPU is "
                             f"sm_{plan.capability[0]}{plan.capability[1]}; bake with --precision int8 or bf16")
    if baked != plan.precision and plan.device == "cuda":
        logger.warning("baked precision {} differs from the plan's {}: the baked weights are used as they are",
                       baked, plan.precision)
