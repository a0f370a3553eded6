"""The denoiser's files in a baked directory: its state_dict as plain safetensors shards + an index.

FP8 (the default): the state_dict of a denoiser whose linears are `weights.fp8.FP8Linear` is plain
tensors already: `<layer>.weight` float8_e4m3fn `[out, in]`, `<layer>.weight_scale` float32
`[out, 1]` (dequantized weight = weight x weight_scale), `<layer>.bias` and every other tensor bf16.
Any safetensors reader sees FP8 codes and their scales side by side; loading needs no library of
ours beyond the module definition. bf16 bakes are plain tensors too.

INT8 is the one exception: torchao's Int8Tensor is a tensor subclass, so such shards are written
in torchao's safetensors layout (`flatten_tensor_state_dict`, type and attributes as JSON in the
header) and rebuilt by `unflatten`. Only int8 bakes import torchao here.

Reading shards (local or streamed) is `weights.reader`'s job.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from weights.errors import IntegrityError

SHARD_PREFIX = "diffusion_pytorch_model"
INDEX_NAME = f"{SHARD_PREFIX}.safetensors.index.json"
# 2 GiB shards: small enough that the S3 stream overlaps downloading one with copying the last,
# large enough that FLUX.1-dev's 11.9 GB is only 6 files.
MAX_SHARD_BYTES = 2 << 30

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # far above any real header (FLUX.1-dev's is ~100 KB); bounds a hostile one


def _nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "tensor_data_names"):  # a torchao subclass: the sum of its parts
        return sum(_nbytes(getattr(t, n)) for n in t.tensor_data_names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def _shards(state: dict, max_bytes: int) -> list[dict]:
    shards, cur, size = [], {}, 0
    for name, tensor in state.items():
        n = _nbytes(tensor)
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tensor
        size += n
    if cur:
        shards.append(cur)
    return shards


def is_subclass(t: torch.Tensor) -> bool:
    """A tensor subclass (torchao's Int8Tensor...) rather than a plain tensor or Parameter."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def _flatten(shard: dict) -> tuple[dict, dict | None]:
    """(plain tensors, header metadata) of one shard: as is, or torchao's layout for subclasses."""
    if not any(is_subclass(t) for t in shard.values()):
        return shard, None
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    return flatten_tensor_state_dict(shard)


def write_denoiser(denoiser, folder: Path, max_shard_bytes: int | None = None) -> list[Path]:
    """Write `config.json`, the shards and an index; return the shard paths."""
    max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    denoiser.save_config(folder)
    state = {k: v.detach() for k, v in denoiser.state_dict().items()}
    meta = sorted(k for k, v in state.items() if v.is_meta)
    if meta:
        raise IntegrityError(f"{folder}: tensors still on the meta device (never loaded): {meta[:3]}")
    shards = _shards(state, max_shard_bytes)
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"{SHARD_PREFIX}-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors, metadata = _flatten(shard)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
        paths.append(folder / name)
        del tensors
    total = sum(_nbytes(t) for t in state.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=1))
    return paths


def shard_names(folder: Path) -> list[str]:
    """The shard file names listed by the index, in order."""
    index = json.loads((folder / INDEX_NAME).read_text())
    return sorted(set(index["weight_map"].values()))


def read_header(data: bytes | memoryview, name: str) -> tuple[dict, int]:
    """(header dict, offset of the data section) of a safetensors file held in `data`."""
    if len(data) < 8:
        raise IntegrityError(f"{name}: {len(data)} bytes, too short for a safetensors header (truncated?)")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if 8 + n > len(data) or n > MAX_HEADER_BYTES:
        raise IntegrityError(f"{name}: header length {n} exceeds the file ({len(data)} bytes; truncated?)")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, RecursionError):
        raise IntegrityError(f"{name}: the safetensors header is not valid JSON (altered or truncated)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise IntegrityError(f"{name}: the safetensors header is not a JSON object of tensors (altered?)")
    return header, 8 + n


def read_file_header(path: Path) -> tuple[dict, int, int]:
    """(header, data offset, file size) of a local safetensors file, the header length bounded by the
    file's own size before anything is allocated (a length of 1e12 is a refusal, not a MemoryError)."""
    path = Path(path)
    if not path.exists():
        raise IntegrityError(f"{path}: no such file")
    if not path.is_file():
        raise IntegrityError(f"{path}: not a file (a single .safetensors checkpoint is expected)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise IntegrityError(f"{path}: {len(first)} bytes, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", first)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise IntegrityError(f"{path}: header length {n} exceeds the file ({size} bytes; truncated or not "
                                 "a safetensors file?)")
        header, start = read_header(first + f.read(n), str(path))
    return header, start, size


def write_streamed(folder: Path, specs: list[tuple[str, torch.dtype, tuple]], produce,
                   max_shard_bytes: int | None = None) -> list[Path]:
    """Write shards + index of tensors described by `specs` [(name, dtype, shape)], in that order,
    whose bytes come from `produce(name)`, an iterator of tensors (row pieces) written as they come:
    memory holds one piece at a time, never a shard (safetensors' save_file copies a whole shard)."""
    max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {n: math.prod(s) * d.itemsize for n, d, s in specs}
    groups, cur, total = [], [], 0
    for spec in specs:
        if cur and total + sizes[spec[0]] > max_shard_bytes:
            groups.append(cur)
            cur, total = [], 0
        cur.append(spec)
        total += sizes[spec[0]]
    groups += [cur] if cur else []
    paths, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        name = f"{SHARD_PREFIX}-{i:05d}-of-{len(groups):05d}.safetensors"
        header, at = {}, 0
        for n, d, s in group:
            header[n] = {"dtype": _NAMES[d], "shape": list(s), "data_offsets": [at, at + sizes[n]]}
            at += sizes[n]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for n, d, s in group:
                wrote = 0
                for piece in produce(n):
                    if piece.dtype != d:
                        raise IntegrityError(f"{n}: produced {piece.dtype}, the header says {d}")
                    data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
                    f.write(memoryview(data))
                    wrote += data.nbytes
                if wrote != sizes[n]:
                    raise IntegrityError(f"{n}: produced {wrote} bytes, its shape {list(s)} needs {sizes[n]}")
        weight_map.update({n: name for n, _, _ in group})
        paths.append(folder / name)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())},
                                                 "weight_map": weight_map}, indent=1))
    return paths


def unflatten(tensors: dict, metadata: dict, name: str) -> dict:
    """A shard's state: its plain tensors as they are, or torchao's unflatten of an int8 shard
    (with leftovers, tensors the header does not describe, refused)."""
    if "tensor_names" not in metadata:
        return tensors
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    state, left = unflatten_tensor_state_dict(tensors, metadata)
    expected = json.loads(metadata["tensor_names"])
    missing = [k for k in expected if k not in state]
    if left or missing:
        raise IntegrityError(f"{name}: tensors missing {missing[:3]} or undescribed {sorted(left)[:3]}")
    return state
