"""Load a baked directory: denoiser skeleton on the meta device, stored tensors straight in.

The skeleton is built from the denoiser's config.json on the meta device and given the baked
structure by the same `weights.quantize.quantize_denoiser` the bake ran, with the skip list the
manifest recorded (fused QKV, `FP8Linear` on the quantized linears), so its state_dict names and
dtypes are those of the files. `weights.reader` then puts each stored tensor on the target device
(parallel reads into pinned buffers, asynchronous copies) and one `load_state_dict(strict=True,
assign=True)` swaps them in: no bf16 copy of a quantized weight ever exists and nothing is
re-quantized. Everything here reads the manifest, not a model family: the worker maps the result
to its family. The other components (VAE, text encoders) are ordinary diffusers folders, read the
same way: a meta skeleton from their config.json, filled by `weights.reader` (`load_components`).
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


def _place(key: str, t: torch.Tensor, like: torch.Tensor, device: str, name: str, what: str = "denoiser"
           ) -> torch.Tensor:
    """`t` on `device` in the skeleton's dtype. Only plain floats are converted (a bf16 bake in an fp16
    plan); FP8 codes never are (that would re-quantize or use raw codes as numbers), nor are integers
    where floats are expected or the reverse: such a mismatch is refused."""
    if is_subclass(t):  # an int8 bake's torchao tensor: its own dtype
        return t.to(device)
    floats = t.is_floating_point() and like.is_floating_point()
    if t.dtype != like.dtype and (t.dtype in FP8_DTYPES or like.dtype in FP8_DTYPES or not floats):
        raise IntegrityError(f"{name}: tensor {key} is {t.dtype}, the {what} expects {like.dtype} "
                             "(baked with another precision or recipe?)")
    if tuple(t.shape) != tuple(like.shape):
        raise IntegrityError(f"{name}: tensor {key} has shape {list(t.shape)}, the {what} expects "
                             f"{list(like.shape)}")
    return t.to(device=device, dtype=like.dtype if t.is_floating_point() else t.dtype)


def fill(model, shards: Iterable[Shard], device: str, what: str = "denoiser"):
    """Load every shard's tensors into `model` with one strict `load_state_dict(assign=True)`.

    Unknown and duplicate tensors fail at the shard that holds them (before the rest is read),
    missing ones after the last shard; each error names the tensors and the file. Tied tensors (one
    parameter under two names, as T5's embeddings) are stored once: the other names get the same tensor.
    """
    expected = model.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
    aliases: dict[int, list[str]] = {}
    for k, t in expected.items():
        aliases.setdefault(id(t), []).append(k)
    state: dict[str, torch.Tensor] = {}
    for name, tensors, metadata in shards:
        part = unflatten(tensors, metadata, name)
        unknown = sorted(set(part) - set(expected))
        if unknown:
            raise IntegrityError(f"{name}: unexpected tensors, the {what} has no {unknown[:3]}")
        dup = sorted(set(state) & set(part))
        if dup:
            raise IntegrityError(f"{name}: tensors already loaded from another shard: {dup[:3]}")
        state.update({k: _place(k, v, expected[k], device, name, what) for k, v in part.items()})
    for k in list(state):
        for other in aliases[id(expected[k])]:
            state.setdefault(other, state[k])
    missing = sorted(set(expected) - set(state))
    if missing:
        raise IntegrityError(f"baked {what} lacks {len(missing)} tensors, missing e.g. {missing[:3]}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise IntegrityError(f"baked {what} does not fit its skeleton: {str(e)[:500]}") from None
    if hasattr(model, "tie_weights"):  # transformers: assign gave each name its own Parameter; one again
        model.tie_weights()
    for module in model.modules():  # constructor-computed buffers (not in the files) follow the weights
        for n in module._non_persistent_buffers_set:
            if module._buffers.get(n) is not None:
                module._buffers[n] = module._buffers[n].to(device)
    left = sorted(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
    if left:
        raise IntegrityError(f"baked {what} left tensors on the meta device: {left[:3]}")
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


WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' file names


def component_files(folder: Path) -> list[Path] | None:
    """A component folder's safetensors files (one, or the shards its index names); None when it has none."""
    for stem in WEIGHT_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise IntegrityError(f"{folder.name}/{index.name}: not a safetensors index (no weight_map)") from None
            return [folder / n for n in names]
        if (folder / f"{stem}.safetensors").is_file():
            return [folder / f"{stem}.safetensors"]
    return None


def component_skeleton(folder: Path, library: str, class_name: str, dtype: torch.dtype):
    """A text encoder's or VAE's module structure from its config.json, parameters on the meta device, in
    `dtype` except the modules its class keeps in float32 (as from_pretrained does)."""
    import importlib

    cls = getattr(importlib.import_module(library), class_name)
    config = json.loads((folder / "config.json").read_text())
    with _params_on_meta():
        if library == "diffusers":
            model = cls.from_config(config)
        else:
            model = cls(cls.config_class.from_dict(config))
            model.tie_weights()  # tied names share one meta parameter: `fill` then wants the tensor once
    computed = {n: b for n, b in model.named_buffers() if not b.is_meta}
    model.to(dtype)
    for name, module in model.named_modules():
        if name and any(k in name for k in _kept_fp32(cls, library, dtype)):
            module.to(torch.float32)
    for n, b in computed.items():  # e.g. CLIP's position ids: kept as computed, not cast
        parent, _, attr = n.rpartition(".")
        model.get_submodule(parent)._buffers[attr] = b
    return model


def _kept_fp32(cls, library: str, dtype: torch.dtype) -> list[str]:
    """The module names a class keeps in float32 at `dtype`, by its library's own from_pretrained rule:
    diffusers always; transformers `_keep_in_fp32_modules` under fp16 and `..._strict` under fp16 and bf16."""
    if library == "diffusers":
        return list(cls._keep_in_fp32_modules or [])
    keep = list(getattr(cls, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])
    return keep


def load_components(root: Path, skip, target: Target) -> dict:
    """Every model component of the baked directory but those in `skip` (the denoisers), each built on the meta
    device and filled by `weights.reader` in its final place, with the denoiser's refusals (a truncated
    file, a wrong shape or dtype, an unknown or missing tensor: named). Tokenizers, schedulers and
    components without safetensors are left to from_pretrained."""
    skip = {skip} if isinstance(skip, str) else set(skip)
    index = json.loads((Path(root) / "model_index.json").read_text())
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or name in skip or not isinstance(spec, list) or len(spec) != 2:
            continue
        library, class_name = spec
        folder = Path(root) / name
        files = component_files(folder) if library in ("diffusers", "transformers") and folder.is_dir() else None
        if not files or not (folder / "config.json").is_file():
            continue
        model = component_skeleton(folder, library, class_name, target.dtype)
        names = [f"{name}/{f.name}" for f in files]
        if not _names_match(model, files, names):
            # A checkpoint naming scheme of its own (transformers 5 renames Qwen2.5-VL's keys on load):
            # only from_pretrained knows the mapping. Rare, and said so; never a silent partial load here.
            logger.info("{} ({}): its files name tensors another way than the module; from_pretrained loads it",
                        name, class_name)
            continue
        out[name] = fill(model, read_shards(files, target.device, names), target.device, what=f"{name} ({class_name})")
    return out


def _names_match(model, files: list[Path], names: list[str]) -> bool:
    """Whether the files' tensor names are the module's own (most of them: a few wrong or missing ones
    are a damaged file, refused by `fill` naming them; none or few in common is another naming scheme)."""
    from weights.reader import head_size
    from weights.serialize import read_header

    stored: set[str] = set()
    for path, name in zip(files, names):
        with open(path, "rb") as f:
            first = f.read(8)
            header, _ = read_header(first + f.read(head_size(first) - len(first)), name)
        stored |= {k for k in header if k != "__metadata__"}
    expected = set(model.state_dict(keep_vars=True))
    return len(stored & expected) * 2 >= len(stored)


def assemble(root: Path, manifest: dict, target: Target, loaded: dict):
    """The full pipeline: the given denoisers ({folder name: module}), the other models read by
    `weights.reader` (`load_components`), and what from_pretrained makes from small files (tokenizers,
    the scheduler). Text encoders baked FP8 hold e4m3 codes: from_pretrained reads them, then their
    scales are restored before the move, so the GPU sees FP8 only."""
    import diffusers

    cls = getattr(diffusers, pipeline_class(root))
    encoders = manifest.get("text_encoders") or {}
    fp8_text = encoders.get("precision") == "fp8"
    skip = set(loaded) | (set(encoders.get("layers") or ()) if fp8_text else set())
    parts = load_components(root, skip, target)
    pipe = cls.from_pretrained(str(root), torch_dtype=target.dtype, **parts, **loaded)
    if fp8_text:
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
