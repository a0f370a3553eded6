"""Read safetensors shards into device memory at disk / page-cache speed.

Why not `safetensors.safe_open(device="cuda")`: it maps the file and copies one tensor at a time
from pageable (mmap) memory, so every 4 KiB page faults in and every copy is synchronous and staged
by the driver. Measured on an H100 in a fresh process (bench/results/assemble_h100.json): the
15.2 GB FP8 FLUX.1-dev denoiser took 14-19 s from the page cache, about 1 GB/s.

Here, every tensor is allocated once in its final place (ordinary caching-allocator tensors, not
views of one big buffer, so torch.compile sees plain parameters), and the file's data section is
read in SPAN_BYTES pieces by THREADS threads with `os.preadv` (which releases the GIL) into pinned
staging buffers, each thread copying its piece into the tensors it overlaps on its own CUDA stream
while the other threads read. On the CPU the same code runs with plain staging buffers and
synchronous copies, which is what the tests exercise.

Every tensor's byte range is checked against the header and the file's length before a byte of
data is read, so a truncated or altered file names itself instead of loading garbage.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from weights.errors import IntegrityError
from weights.serialize import _DTYPES, read_header

SPAN_BYTES = 64 << 20  # one pread + its copies; large enough that per-call overhead is noise
THREADS = 8  # page-cache reads are a memcpy per thread; 8 saturate host memory bandwidth


@dataclass(frozen=True)
class _Entry:
    key: str
    begin: int  # byte offsets within the data section
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def entries(header: dict, data_bytes: int, name: str) -> list[_Entry]:
    """The header's tensors sorted by offset, each byte range checked against its shape and the file."""
    out = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise IntegrityError(f"{name}: tensor {key}: header entry is not an object (altered header?)")
        dtype = _DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise IntegrityError(f"{name}: tensor {key} has unsupported dtype {info.get('dtype')}")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and isinstance(shape, list)
                and all(type(v) is int and v >= 0 for v in offsets + shape)):
            raise IntegrityError(f"{name}: tensor {key}: shape {shape} / data_offsets {offsets} are not "
                                 "non-negative integers (altered header?)")
        begin, end = offsets
        shape = tuple(shape)
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise IntegrityError(f"{name}: tensor {key} spans bytes {begin}-{end} but its shape {list(shape)} "
                                 f"and dtype need {numel * dtype.itemsize} (altered header?)")
        if end > data_bytes:
            raise IntegrityError(f"{name}: tensor {key} ends at byte {end} of the data section but the file "
                                 f"holds {data_bytes} (truncated)")
        out.append(_Entry(key, begin, end, dtype, shape))
    out.sort(key=lambda e: e.begin)
    for prev, e in zip(out, out[1:]):
        if e.begin < prev.end:
            raise IntegrityError(f"{name}: tensors {prev.key} and {e.key} overlap (altered header?)")
    return out


Fill = Callable[[int, int, memoryview], None]  # (chunk index, file offset, buffer to fill exactly)


class ShardReader:
    """Reads shards onto one device with a fixed pool of threads and staging buffers (reused across
    shards, since pinning host memory costs milliseconds per buffer).

    A file is cut into `chunk`-sized spans of the whole file (span i = bytes [i*chunk, (i+1)*chunk)),
    the same cut the manifest hashes, so a remote source can check each span as it lands.
    """

    def __init__(self, device: str | torch.device, threads: int = THREADS, chunk: int = SPAN_BYTES):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.chunk = chunk
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-read")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors on the device, header `__metadata__`) of one local safetensors file."""
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:  # the header only: its length, then itself
            first = f.read(8)
            head = first + f.read(head_size(first) - len(first))
        fd = os.open(path, os.O_RDONLY)
        try:
            return self.read_from(lambda i, lo, view: pread_exact(fd, view, lo, path), size, head, str(path))
        finally:
            os.close(fd)

    def read_from(self, fill: Fill, size: int, head: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Like `read`, from any source: `head` holds at least the file's header, `fill(i, lo, view)`
        puts file bytes [lo, lo + len(view)) into `view` (and may check them: it sees whole spans)."""
        header, start = read_header(head, name)
        metadata = header.pop("__metadata__", {}) or {}
        items = entries(header, size - start, name)
        tensors = {e.key: torch.empty(e.shape, dtype=e.dtype, device=self.device) for e in items}
        flat = [tensors[e.key].view(-1).view(torch.uint8) if e.end > e.begin else None for e in items]
        layout = _Layout(start, items, [e.begin for e in items], flat, bytes(head[:start]))
        if self.device.type == "cuda":
            # The copies run on the threads' own streams: memory the allocator just handed out may
            # still be read by queued work on the caller's stream (blocks freed before), so wait for it.
            torch.cuda.current_stream(self.device).synchronize()
        _finish([self._pool.submit(self._copy_span, fill, i, size, layout) for i in range(-(-size // self.chunk))])
        return tensors, metadata

    def map_spans(self, work: Callable[[int, int, memoryview], None], size: int) -> None:
        """Run `work(i, lo, view)` for every span of a `size`-byte file on the pool, each with a
        filled-in-place staging view (for downloads that go to a file, not to tensors)."""
        def one(i):
            buf, view, _ = self._stage()
            lo = i * self.chunk
            work(i, lo, view[:min(self.chunk, size - lo)])
        _finish([self._pool.submit(one, i) for i in range(-(-size // self.chunk))])

    def _stage(self) -> tuple[torch.Tensor, memoryview, torch.cuda.Stream | None]:
        """This thread's staging buffer (pinned for a GPU) and CUDA stream, made once."""
        if not hasattr(self._local, "stage"):
            cuda = self.device.type == "cuda"
            buf = torch.empty(self.chunk, dtype=torch.uint8, pin_memory=cuda)
            stream = torch.cuda.Stream(self.device) if cuda else None
            self._local.stage = (buf, memoryview(buf.numpy()), stream)
        return self._local.stage

    def _copy_span(self, fill: Fill, i: int, size: int, layout: "_Layout") -> None:
        """Fill span i of the file, then copy each overlapped tensor's part of it to the device."""
        buf, view, stream = self._stage()
        lo = i * self.chunk
        hi = min(lo + self.chunk, size)
        fill(i, lo, view[:hi - lo])
        if lo < layout.start and bytes(view[:min(hi, layout.start) - lo]) != layout.head[lo:min(hi, layout.start)]:
            raise IntegrityError("the safetensors header changed between its first read and its checked one")
        dlo, dhi = max(lo - layout.start, 0), hi - layout.start  # this span in data-section coordinates
        first = max(bisect.bisect_right(layout.begins, dlo) - 1, 0)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for e, dst in zip(layout.items[first:], layout.flat[first:]):
                if e.begin >= dhi:
                    break
                a, b = max(e.begin, dlo), min(e.end, dhi)
                if dst is not None and a < b:
                    src = buf[a + layout.start - lo:b + layout.start - lo]
                    dst[a - e.begin:b - e.begin].copy_(src, non_blocking=stream is not None)
        if stream is not None:
            stream.synchronize()  # the staging buffer is reused by this thread's next span


@dataclass(frozen=True)
class _Layout:
    start: int  # file offset of the data section
    items: list[_Entry]
    begins: list[int]
    flat: list  # each tensor's bytes (uint8 view), None for empty tensors
    head: bytes  # the header bytes as first read (a checked source must deliver the same)


def head_size(first: bytes) -> int:
    """Bytes to read for a safetensors header given the file's first 8 (capped: `read_header` refuses
    a length past 100 MiB with a clear message, with no need to read that much first)."""
    return 8 + min(struct.unpack("<Q", first)[0], (100 << 20) + 1) if len(first) == 8 else len(first)


def pread_exact(fd: int, view: memoryview, offset: int, path) -> None:
    """Fill `view` from `fd` at `offset`; a file that ends first is truncated."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise IntegrityError(f"{path}: file ended at byte {offset + got} while reading (truncated?)")
        got += n


def _finish(jobs: list[Future]) -> None:
    """Wait for every job; on the first failure cancel those not started, wait for the running ones
    (they use the caller's file descriptor and buffers), then raise it."""
    done, _ = wait(jobs, return_when=FIRST_EXCEPTION)
    failed = next((j for j in done if j.exception() is not None), None)
    if failed is not None:
        for j in jobs:
            j.cancel()
        wait(jobs)
        raise failed.exception()


def read_shards(paths: Iterable[Path], device: str, names: Iterable[str] | None = None,
                threads: int = THREADS, chunk: int = SPAN_BYTES) -> Iterator[tuple[str, dict, dict]]:
    """(name, tensors, metadata) for each path in order; names default to the paths."""
    paths = list(paths)
    names = list(names) if names is not None else [str(p) for p in paths]
    with ShardReader(device, threads, chunk) as reader:
        for name, path in zip(names, paths):
            tensors, metadata = reader.read(path)
            yield name, tensors, metadata
