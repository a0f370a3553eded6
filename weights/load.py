"""Load a baked directory: denoiser skeleton on the meta device, stored tensors straight in.

The skeleton is built from the denoiser's config.json on the meta device and given the baked
structure by the same `app.optimize.quantize_denoiser` the bake ran (fused QKV, `FP8Linear` on the
quantized linears), so its state_dict names and dtypes are those of the files. `weights.reader` then puts each stored
tensor (FP8 codes, float32 scales, bf16 norms and biases) on the target device (parallel reads into
pinned buffers, asynchronous copies) and one `load_state_dict(strict=True, assign=True)` swaps them
in. No bf16 copy of a quantized weight ever exists and nothing is re-quantized: VRAM peaks at the
FP8 size, host RAM at the reader's staging buffers (8 x 64 MiB).
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
from weights.reader import read_shards
from weights.serialize import is_subclass, shard_names, unflatten

Shard = tuple[str, dict, dict]  # (name, tensors, safetensors metadata)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def skeleton(folder: Path, family: Family, precision: str, dtype: torch.dtype = torch.bfloat16,
             fused: bool = True):
    """The baked denoiser's module structure, every tensor on the meta device, in `dtype`.

    fp8: fused QKV + FP8Linear exactly where the bake put them (same function, same skip list).
    int8 and bf16: fused only; an int8 bake's torchao tensors replace the meta weights on assign.
    """
    import diffusers

    from app.optimize import fuse_qkv, quantize_denoiser

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(config)
    model.to(dtype)
    if precision == "fp8":
        quantize_denoiser(model, family, "fp8")
    elif fused:
        fuse_qkv(model)
    return model


def _place(key: str, t: torch.Tensor, like: torch.Tensor, device: str, name: str) -> torch.Tensor:
    """`t` on `device` in the skeleton's dtype. Only plain floats are converted (a bf16 bake in an fp16
    plan); FP8 codes never are (that would re-quantize or use raw codes as numbers), nor are integers
    where floats are expected or the reverse: such a mismatch is refused."""
    if is_subclass(t):  # an int8 bake's torchao tensor: its own dtype
        return t.to(device)
    floats = t.is_floating_point() and like.is_floating_point()
    if t.dtype != like.dtype and (t.dtype in _FP8 or like.dtype in _FP8 or not floats):
        raise IntegrityError(f"{name}: tensor {key} is {t.dtype}, the denoiser expects {like.dtype} "
                             "(baked with another precision or recipe?)")
    if tuple(t.shape) != tuple(like.shape):
        raise IntegrityError(f"{name}: tensor {key} has shape {list(t.shape)}, the denoiser expects "
                             f"{list(like.shape)}")
    return t.to(device=device, dtype=like.dtype if t.is_floating_point() else t.dtype)


def fill(model, shards: Iterable[Shard], device: str):
    """Load every shard's tensors into `model` with one strict `load_state_dict(assign=True)`.

    Unknown and duplicate tensors fail at the shard that holds them (before the rest is read),
    missing ones after the last shard; each error names the tensors and the file.
    """
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, tensors, metadata in shards:
        part = unflatten(tensors, metadata, name)
        unknown = sorted(set(part) - set(expected))
        if unknown:
            raise IntegrityError(f"{name}: unexpected tensors, the denoiser has no {unknown[:3]}")
        dup = sorted(set(state) & set(part))
        if dup:
            raise IntegrityError(f"{name}: tensors already loaded from another shard: {dup[:3]}")
        state.update({k: _place(k, v, expected[k], device, name) for k, v in part.items()})
    missing = sorted(set(expected) - set(state))
    if missing:
        raise IntegrityError(f"baked denoiser lacks {len(missing)} tensors, missing e.g. {missing[:3]}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise IntegrityError(f"baked denoiser does not fit its skeleton: {str(e)[:500]}") from None
    left = sorted(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
    if left:
        raise IntegrityError(f"baked denoiser left tensors on the meta device: {left[:3]}")
    return model.eval().requires_grad_(False)


def local_shards(folder: Path, device: str) -> Iterator[Shard]:
    """The denoiser's shards read by `weights.reader` (parallel preads, pinned staging, async copies)."""
    names = shard_names(folder)
    yield from read_shards([folder / n for n in names], device, [f"{folder.name}/{n}" for n in names])


def load_denoiser(root: Path, manifest: dict, plan: Plan, shards: Iterable[Shard] | None = None,
                  times: dict | None = None):
    """The baked denoiser on plan.device; `shards` defaults to the local files. `times`, when given,
    receives the seconds spent building the skeleton and reading + assigning the tensors."""
    folder = Path(root) / manifest["denoiser"]
    t0 = time.perf_counter()
    model = skeleton_of(root, manifest, plan)
    t1 = time.perf_counter()
    device = _device(plan)
    model = fill(model, shards if shards is not None else local_shards(folder, device), device)
    if plan.device == "cuda":
        torch.cuda.synchronize()
    if times is not None:
        times.update(skeleton_s=round(t1 - t0, 2), tensors_s=round(time.perf_counter() - t1, 2))
    return model


def skeleton_of(root: Path, manifest: dict, plan: Plan):
    """The meta skeleton for the baked denoiser under `root`, in the plan's dtype."""
    recipe = manifest["recipe"]
    return skeleton(Path(root) / manifest["denoiser"], family_of(manifest), recipe["precision"], plan.torch_dtype,
                    recipe.get("fused_qkv", True))


def assemble(root: Path, manifest: dict, plan: Plan, denoiser, direct: bool = False):
    """The full pipeline: the given denoiser plus every other component read from `root`.

    `direct` (GPU only) loads the other components straight onto the GPU (`device_map`) instead of
    into host memory and then `.to(cuda)`. Measured on H100 in fresh processes, FLUX.1-dev shape
    (bench/results/assemble_h100.json): no difference (2.1-2.6 s vs 2.7 s for T5-XXL + CLIP + VAE),
    so it stays off; the baked denoiser (14-19 s there) is what dominates.
    """
    import diffusers

    family = family_of(manifest)
    cls = getattr(diffusers, family.pipeline_class)
    kw = {"device_map": plan.device} if direct and plan.device == "cuda" else {}
    pipe = cls.from_pretrained(str(root), torch_dtype=plan.torch_dtype, **kw, **{family.denoiser: denoiser})
    if not kw:
        pipe = pipe.to(plan.device)
    pipe.source_model = manifest["source"]["id"]  # what was baked: decides defaults (tiny or not)
    return pipe


def load_baked(path: str | Path, plan: Plan):
    """A ready pipeline from a baked directory (sizes checked; `python -m weights verify` hashes)."""
    root = Path(path)
    manifest = mf.read(root)
    _check_plan(manifest, plan)
    # Sizes only: hashing 12 GB costs seconds on every cold start, and a baked image is immutable;
    # full hashes are `python -m weights verify` (build time) and the S3 stream (every byte).
    mf.check_sizes(root, manifest)
    times: dict = {}
    # Read after the skeleton, not during it. Reading the shards on a thread while the skeleton's
    # diffusers import ran (8-10 s on the H200 machine's image) made the weights phase slower, not
    # faster: 14.7 s against 12.0 s sequential in bench coldstart (one run each, H200; the readers
    # and the import contend for the GIL): bench/results/coldstart_h200_prefetch.json.
    denoiser = load_denoiser(root, manifest, plan, times=times)
    nbytes = sum(i["size"] for n, i in manifest["files"].items() if n.startswith(manifest["denoiser"] + "/"))
    logger.info("baked denoiser: skeleton {} s, {:.2f} GB of tensors in {} s ({:.2f} GB/s)", times["skeleton_s"],
                nbytes / 1e9, times["tensors_s"], nbytes / 1e9 / max(times["tensors_s"], 1e-3))
    t0 = time.perf_counter()
    pipe = assemble(root, manifest, plan, denoiser)
    logger.info("other components (text encoders, VAE) in {:.2f} s", time.perf_counter() - t0)
    return pipe


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
