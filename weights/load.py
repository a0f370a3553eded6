"""Load a baked directory: denoiser skeleton on the meta device, stored tensors straight in.

The skeleton is built from the denoiser's config.json on the meta device and given the baked
structure by the same `weights.quantize.quantize_denoiser` the bake ran, with the skip list the
manifest recorded (fused QKV, `FP8Linear` on the quantized linears), so its state_dict names and
dtypes are those of the files. `weights.reader` then puts each stored tensor on the target device
(parallel reads into pinned buffers, asynchronous copies) and one `load_state_dict(strict=True,
assign=True)` swaps them in: no bf16 copy of a quantized weight ever exists and nothing is
re-quantized. Everything here reads the manifest, not a model family: the worker maps the result
to its family. The other components (VAE, text encoders) are ordinary diffusers folders.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from loguru import logger

from weights import manifest as mf
from weights.errors import IntegrityError
from weights.fp8 import FLOAT8
from weights.quantize import fuse_qkv, quantize_denoiser, skip_patterns
from weights.reader import read_shards
from weights.serialize import is_subclass, shard_names, unflatten

Shard = tuple[str, dict, dict]  # (name, tensors, safetensors metadata)
FP8_DTYPES = FLOAT8  # never converted as numbers: refused where the skeleton expects another dtype


@dataclass(frozen=True)
class Target:
    """Where and how a baked model is loaded: the device string, the dtype of its plain floats, and the
    GPU's compute capability (None on a CPU), against which a baked precision is checked."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    capability: tuple[int, int] | None = None
    precision: str | None = None  # what the worker planned; a different baked one is used as it is, with a warning


@dataclass
class LoadTimes:
    """Seconds spent building the meta skeleton and reading + assigning the stored tensors."""

    skeleton_s: float = 0.0
    tensors_s: float = 0.0


def skeleton(folder: Path, precision: str, skip, dtype: torch.dtype = torch.bfloat16, fused: bool = True):
    """The baked denoiser's module structure, every tensor on the meta device, in `dtype`.

    fp8: fused QKV + FP8Linear exactly where the bake put them (same function, same skip list).
    int8 and bf16: fused only; an int8 bake's torchao tensors replace the meta weights on assign.
    """
    return build_skeleton(json.loads((folder / "config.json").read_text()), precision, skip, dtype, fused)


def build_skeleton(config: dict, precision: str, skip, dtype: torch.dtype = torch.bfloat16, fused: bool = True):
    """`skeleton` from a config dict."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    with _params_on_meta():
        model = cls.from_config(config)
    computed = {n: b for n, b in model.named_buffers() if not b.is_meta}
    model.to(dtype)
    for n, b in computed.items():  # e.g. Wan's RoPE tables: kept as computed (fp32), not cast
        parent, _, attr = n.rpartition(".")
        model.get_submodule(parent)._buffers[attr] = b
    if precision == "fp8":
        quantize_denoiser(model, "fp8", skip, fuse=fused)
    elif fused:
        fuse_qkv(model)
    return model


@contextmanager
def _params_on_meta():
    """Parameters on the meta device, buffers real: the non-persistent buffers a model computes in its
    constructor (Wan's RoPE tables) are in no file, so they must exist; parameters are only shapes."""
    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _place(key: str, t: torch.Tensor, like: torch.Tensor, device: str, name: str) -> torch.Tensor:
    """`t` on `device` in the skeleton's dtype. Only plain floats are converted (a bf16 bake in an fp16
    plan); FP8 codes never are (that would re-quantize or use raw codes as numbers), nor are integers
    where floats are expected or the reverse: such a mismatch is refused."""
    if is_subclass(t):  # an int8 bake's torchao tensor: its own dtype
        return t.to(device)
    floats = t.is_floating_point() and like.is_floating_point()
    if t.dtype != like.dtype and (t.dtype in FP8_DTYPES or like.dtype in FP8_DTYPES or not floats):
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
    for module in model.modules():  # constructor-computed buffers (not in the files) follow the weights
        for n in module._non_persistent_buffers_set:
            if module._buffers.get(n) is not None:
                module._buffers[n] = module._buffers[n].to(device)
    left = sorted(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
    if left:
        raise IntegrityError(f"baked denoiser left tensors on the meta device: {left[:3]}")
    return model.eval().requires_grad_(False)


def local_shards(folder: Path, device: str) -> Iterator[Shard]:
    """The denoiser's shards read by `weights.reader` (parallel preads, pinned staging, async copies)."""
    names = shard_names(folder)
    yield from read_shards([folder / n for n in names], device, [f"{folder.name}/{n}" for n in names])


def denoisers(manifest: dict) -> list[str]:
    """The baked denoisers' folder names: the main one, then any further one (Wan 2.2's transformer_2)."""
    return [manifest["denoiser"], *manifest.get("extra_denoisers", ())]


def load_denoiser(root: Path, manifest: dict, target: Target, shards: Iterable[Shard] | None = None,
                  name: str | None = None) -> tuple[torch.nn.Module, LoadTimes]:
    """(the baked denoiser `name` (default: the main one) on target.device, its load times); `shards`
    defaults to the local files."""
    folder = Path(root) / (name or manifest["denoiser"])
    t0 = time.perf_counter()
    model = skeleton_of(root, manifest, target.dtype, name)
    t1 = time.perf_counter()
    model = fill(model, shards if shards is not None else local_shards(folder, target.device), target.device)
    if target.device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, LoadTimes(round(t1 - t0, 2), round(time.perf_counter() - t1, 2))


def skeleton_of(root: Path, manifest: dict, dtype: torch.dtype, name: str | None = None):
    """The meta skeleton for the baked denoiser `name` under `root`, quantized as its manifest records
    (every denoiser of a bake shares its recipe and skip list)."""
    recipe = manifest["recipe"]
    return skeleton(Path(root) / (name or manifest["denoiser"]), recipe["precision"],
                    skip_patterns(recipe.get("skip", ())), dtype, recipe.get("fused_qkv", True))


def pipeline_class(root: Path) -> str:
    """The diffusers pipeline class a baked (or any diffusers) directory names in model_index.json."""
    index = Path(root) / "model_index.json"
    try:
        return json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError):
        raise IntegrityError(f"{index}: missing or without _class_name") from None


def assemble(root: Path, manifest: dict, target: Target, loaded: dict):
    """The full pipeline: the given denoisers ({folder name: module}) plus every other component read
    from `root`."""
    import diffusers

    cls = getattr(diffusers, pipeline_class(root))
    pipe = cls.from_pretrained(str(root), torch_dtype=target.dtype, **loaded)
    encoders = manifest.get("text_encoders")
    if encoders and encoders.get("precision") == "fp8":  # before the move: the GPU sees FP8 only
        from weights.text_fp8 import restore

        restore(pipe, root, encoders["layers"])
    return pipe.to(target.device)


def log_times(what: str, nbytes: int, times: LoadTimes) -> None:
    logger.info("{}: skeleton {} s, {:.2f} GB of tensors in {} s ({:.2f} GB/s)", what, times.skeleton_s,
                nbytes / 1e9, times.tensors_s, nbytes / 1e9 / max(times.tensors_s, 1e-3))


def denoiser_bytes(manifest: dict, name: str | None = None) -> int:
    prefix = (name or manifest["denoiser"]) + "/"
    return sum(i["size"] for n, i in manifest["files"].items() if n.startswith(prefix))


def load_baked(path: str | Path, target: Target, manifest: dict | None = None):
    """A ready pipeline from a baked directory (sizes checked; `python -m weights verify` hashes)."""
    root = Path(path)
    manifest = manifest or mf.read(root)
    check_target(manifest, target)
    # Sizes only: hashing 12 GB costs seconds on every cold start, and a baked image is immutable;
    # full hashes are `python -m weights verify` (build time) and the S3 stream (every byte).
    mf.check_sizes(root, manifest)
    # Read after the skeleton, not during it: a reader thread beside the diffusers import made the
    # phase slower (14.7 s against 12.0 s, bench/results/coldstart_h200_prefetch.json).
    loaded = {}
    for name in denoisers(manifest):
        loaded[name], times = load_denoiser(root, manifest, target, name=name)
        log_times(f"baked {name}", denoiser_bytes(manifest, name), times)
    t0 = time.perf_counter()
    pipe = assemble(root, manifest, target, loaded)
    logger.info("other components (text encoders, VAE) in {:.2f} s", time.perf_counter() - t0)
    return pipe


def check_target(manifest: dict, target: Target) -> None:
    """Refuse a baked precision this GPU cannot run, instead of failing at the first job."""
    baked = manifest["recipe"]["precision"]
    cap = target.capability
    if baked == "fp8" and cap and cap < (8, 9):
        raise IntegrityError(f"baked FP8 weights need compute capability 8.9+, this GPU is "
                             f"sm_{cap[0]}{cap[1]}; bake with --precision int8 or bf16")
    if target.precision and baked != target.precision and target.device.startswith("cuda"):
        logger.warning("baked precision {} differs from the plan's {}: the baked weights are used as they are",
                       baked, target.precision)
