"""Stream a baked directory from S3 (WEIGHTS_URI=s3://bucket/prefix) into device memory.

Why our own and not run-ai's `runai-model-streamer` (0.17, evaluated): it streams safetensors
tensors well, but it hands back tensors, not bytes, so it cannot check our manifest's sha256 of
every byte, it does not return the safetensors header metadata (int8 bakes keep torchao's layout
there), and it needs a second binary package for S3. Measured on an H200 from local disk, in fresh
processes (bench/results/load_speed_h200.json): our reader 1.3-1.4 s for the 15.2 GB FLUX.1-dev FP8
denoiser, runai-model-streamer 7.5-10.2 s (to host memory, then to the GPU).

How: `weights.reader` cuts each file into the manifest's 64 MiB chunks; WORKERS threads each GET
one chunk with a ranged request straight into their own pinned staging buffer (`readinto`, no
intermediate bytes objects), check its sha256 against the manifest, and copy the tensors it
overlaps to the GPU on their own CUDA stream while the other threads download.
The other components' files (text encoders, VAE) go chunk by chunk into a local cache folder
(`pwrite`, never a whole file in memory) and diffusers loads them from there.

Order of checks, all before the worker takes a job: the manifest parses; every object listed exists
with its exact size (HEAD, before any large read); every chunk's sha256 matches as it arrives.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loguru import logger

from typing import Callable

from weights import manifest as mf
from weights.errors import IntegrityError
from weights.load import Target, assemble, check_target, denoiser_bytes, denoisers, load_denoiser, log_times
from weights.reader import ShardReader, head_size

WORKERS = 16  # parallel ranged GETs; S3 serves ~100 MB/s per connection
HEAD_BYTES = 1 << 20  # first read of a shard: its safetensors header (FLUX's are ~30 KB)


Describe = Callable[[Exception], str]


def _describe(e: Exception) -> str:
    """The S3 error code (or the exception's type) of a failed call: never a URL or a credential."""
    return (getattr(e, "response", None) or {}).get("Error", {}).get("Code") or type(e).__name__


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def read_manifest(client, bucket: str, prefix: str, describe: Describe = _describe) -> dict:
    """The manifest of the baked directory at s3://bucket/prefix."""
    where = f"s3://{bucket}/{_key(prefix, mf.NAME)}"
    try:
        raw = client.get_object(Bucket=bucket, Key=_key(prefix, mf.NAME))["Body"].read()
    except Exception as e:
        raise IntegrityError(f"{where}: {describe(e)}") from None
    return mf.parse(raw, where)


class Fetcher:
    """Ranged, hash-checked reads of the objects of one baked directory."""

    def __init__(self, client, bucket: str, prefix: str, manifest: dict, pool: ThreadPoolExecutor,
                 describe: Describe = _describe):
        self.client, self.bucket, self.prefix, self.manifest, self.pool = client, bucket, prefix, manifest, pool
        self.chunk, self.describe = manifest["chunk_bytes"], describe

    def key(self, name: str) -> str:
        return _key(self.prefix, name)

    def check_sizes(self) -> None:
        """HEAD every object: a missing or truncated object fails before any large read."""
        def head(item):
            name, info = item
            try:
                size = self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ContentLength"]
            except Exception as e:
                raise IntegrityError(f"s3://{self.bucket}/{self.key(name)}: {self.describe(e)}") from None
            if size != info["size"]:
                raise IntegrityError(f"s3://{self.bucket}/{self.key(name)}: {size} bytes, the manifest says "
                                     f"{info['size']} (truncated or replaced)")
        list(self.pool.map(head, self.manifest["files"].items()))

    def get(self, name: str, lo: int, view: memoryview) -> None:
        """Bytes [lo, lo + len(view)) of object `name` read straight into `view` (unchecked)."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name),
                                          Range=f"bytes={lo}-{lo + len(view) - 1}")["Body"]
            got = 0
            while got < len(view):
                n = body.readinto(view[got:])
                if not n:
                    break
                got += n
        except Exception as e:
            raise IntegrityError(f"s3://{self.bucket}/{self.key(name)}: {self.describe(e)}") from None
        if got != len(view):
            raise IntegrityError(f"{name}: bytes {lo}-{lo + len(view) - 1} returned {got} bytes (truncated)")

    def checked(self, name: str):
        """`fill(i, lo, view)` for `weights.reader`: chunk i of `name`, its sha256 checked."""
        info = self.manifest["files"][name]

        def fill(i: int, lo: int, view: memoryview) -> None:
            self.get(name, lo, view)
            if hashlib.sha256(view).hexdigest() != info["chunks"][i]:
                raise IntegrityError(f"{name}: chunk {i} (bytes {lo}-{lo + len(view) - 1}) sha256 differs from "
                                     "the manifest (altered)")
        return fill

    def download(self, name: str, dest: Path, reader: ShardReader) -> None:
        """Object `name` into the file `dest`, chunk by chunk, every chunk checked."""
        size, fill = self.manifest["files"][name]["size"], self.checked(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)

            def write(i: int, lo: int, view: memoryview) -> None:
                fill(i, lo, view)
                os.pwrite(fd, view, lo)
            reader.map_spans(write, size)
        finally:
            os.close(fd)

    def shard(self, name: str, reader: ShardReader) -> tuple[dict, dict]:
        """A denoiser shard's tensors on the reader's device, every chunk checked as it lands."""
        size = self.manifest["files"][name]["size"]
        head = bytearray(min(size, HEAD_BYTES))
        self.get(name, 0, memoryview(head))
        need = min(head_size(bytes(head[:8])), size)
        if need > len(head):  # a header past HEAD_BYTES: one more read
            head = bytearray(need)
            self.get(name, 0, memoryview(head))
        return reader.read_from(self.checked(name), size, bytes(head), name)


def stream_shards(fetcher: Fetcher, names: list[str], device: str):
    """Yield (name, tensors on `device`, metadata) for each denoiser shard, in order."""
    with ShardReader(device, threads=WORKERS, chunk=fetcher.chunk) as reader:
        for name in names:
            tensors, metadata = fetcher.shard(name, reader)
            yield name, tensors, metadata


def cache_root(cache_dir: str | Path, uri: str) -> Path:
    return Path(cache_dir) / "weights" / re.sub(r"[^A-Za-z0-9._-]+", "_", uri.removeprefix("s3://"))


def stream_baked(client, bucket: str, prefix: str, manifest: dict, target: Target, cache_dir: str | Path,
                 describe: Describe = _describe):
    """The pipeline on target.device from the baked directory at s3://bucket/prefix (its `manifest`, read
    with `read_manifest`); every byte hash-checked. `client` is a boto3 S3 client with WORKERS connections."""
    uri = f"s3://{bucket}/{prefix}".rstrip("/")
    check_target(manifest, target)
    names = denoisers(manifest)  # Wan 2.2 A14B: both experts streamed straight to the device
    by_name = {d: sorted(n for n in manifest["files"] if n.startswith(d + "/") and n.endswith(".safetensors"))
               for d in names}
    shards = [n for d in names for n in by_name[d]]
    root = cache_root(cache_dir, uri)
    with ThreadPoolExecutor(WORKERS) as pool:
        fetcher = Fetcher(client, bucket, prefix, manifest, pool, describe)
        fetcher.check_sizes()
        with ShardReader("cpu", threads=WORKERS, chunk=fetcher.chunk) as files:
            for name in (n for n in manifest["files"] if n not in shards):
                fetcher.download(name, root / name, files)
        loaded = {}
        for d in names:
            loaded[d], times = load_denoiser(root, manifest, target, stream_shards(fetcher, by_name[d], target.device),
                                             name=d)
            log_times(f"streamed {d} from {uri}", denoiser_bytes(manifest, d), times)
    return assemble(root, manifest, target, loaded)
