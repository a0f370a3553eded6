"""Compiled artifacts that survive a cold start: torch's portable "mega-cache" blob.

After warm-up the worker saves `torch.compiler.save_cache_artifacts()` (FX graph, AOTAutograd and
Triton kernel caches, ~12 MB for FLUX with regional FP8 compilation) under a key that names
everything that would make the artifacts wrong or useless: GPU name and capability, torch / triton
/ diffusers versions, model, recipe and shape buckets. At the next start the blob is loaded before
the first compile, so compilation finds every kernel already built. Measured on H100 (random
weights, bench/results/probe_h100_1.json): first call 24.1 s without it, 6.6 s with it.

COMPILE_CACHE_URI is a folder (a Modal volume, a RunPod network volume) or s3://bucket/prefix.
A missing, mismatched or corrupt blob is logged and ignored: it costs a compile, never the worker.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loguru import logger


def cache_key(gpu_name: str, capability, model: str, recipe: dict, shapes) -> str:
    """A short hash of what the compiled artifacts depend on, with a readable prefix."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import diffusers

    parts = dict(gpu=gpu_name, cap=list(capability or ()), torch=torch.__version__, triton=triton_version,
                 diffusers=diffusers.__version__, model=model, recipe=recipe, shapes=[list(s) for s in shapes])
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    arch = f"sm{''.join(map(str, capability))}" if capability else "cpu"
    return f"{arch}-torch{torch.__version__.split('+')[0]}-{digest}"


class _Folder:
    def __init__(self, root: str):
        self.root = Path(root)

    def get(self, name: str) -> bytes | None:
        p = self.root / name
        return p.read_bytes() if p.is_file() else None

    def put(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.root / name)


class _S3:
    def __init__(self, uri: str):
        from app.storage import parse_s3_uri, s3_client

        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = s3_client()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def get(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)


def _backend(uri: str):
    return _S3(uri) if uri.startswith("s3://") else _Folder(uri.removeprefix("file://"))


def restore(uri: str | None, key: str) -> bool:
    """Load the artifacts for `key` into torch's caches; False (logged) when absent or unusable."""
    if not uri:
        return False
    try:
        blob = _backend(uri).get(f"{key}.bin")
        if blob is None:
            logger.info("compile cache: no artifacts for {} yet (first start compiles)", key)
            return False
        import torch

        # torch logs and swallows a corrupt or truncated blob (checksum mismatch) and returns None:
        # only a CacheInfo means something was loaded.
        if torch.compiler.load_cache_artifacts(blob) is None:
            logger.warning("compile cache: ignoring artifacts for {} (torch could not read the blob)", key)
            return False
        logger.info("compile cache: restored {} ({:.1f} MB)", key, len(blob) / 1e6)
        return True
    except Exception as e:  # corrupt blob, version skew, storage down: compile instead
        logger.warning("compile cache: ignoring artifacts for {} ({}: {})", key, type(e).__name__, str(e)[:160])
        return False


def save(uri: str | None, key: str) -> int:
    """Save torch's compiled artifacts under `key`; the size in bytes (0 when nothing or failed)."""
    if not uri:
        return 0
    try:
        import torch

        art = torch.compiler.save_cache_artifacts()
        if not art:
            return 0
        _backend(uri).put(f"{key}.bin", art[0])
        logger.info("compile cache: saved {} ({:.1f} MB)", key, len(art[0]) / 1e6)
        return len(art[0])
    except Exception as e:
        logger.warning("compile cache: could not save {} ({}: {})", key, type(e).__name__, str(e)[:160])
        return 0
