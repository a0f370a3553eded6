"""A single-file safetensors checkpoint read a few rows at a time, never mapped or loaded whole.

The header is bounded by the file's size and every tensor's byte range checked against its shape and
the file (`weights.reader.entries`) before a byte of data is read; keys are stripped of their
ComfyUI prefixes, and two keys that strip to the same name are refused, naming both. Rows are read
with `os.pread` into fresh tensors, so host memory holds what the caller keeps and nothing else (an
mmap of a 20 GB file would count every page it touched).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from weights.errors import IntegrityError, UnknownFormat
from weights.reader import entries, pread_exact
from weights.serialize import read_file_header

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
CHUNK_ELEMENTS = 1 << 18  # rows are read and converted in pieces of about this many elements (1 MB of fp32)


def strip(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


@dataclass(frozen=True)
class Stored:
    """One tensor as the header describes it (offsets absolute in the file)."""

    key: str  # stripped of the ComfyUI prefix
    raw: str  # as written in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape[1:]:
            n *= d
        return n


class CheckpointFile:
    """An open checkpoint: `tensors` (stripped key -> Stored), `metadata`, `read(key, lo, hi)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, start, self.size = read_file_header(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, Stored] = {}
        for e in entries(header, self.size - start, str(self.path)):
            key = strip(e.key)
            if key in self.tensors:
                raise UnknownFormat(f"{self.path}: tensors {self.tensors[key].raw} and {e.key} are the same "
                                    f"tensor {key} once the prefix is stripped: refusing to pick one")
            self.tensors[key] = Stored(key, e.key, e.dtype, e.shape, start + e.begin)
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, key: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows [lo, hi) of tensor `key` (all of it by default), in its stored dtype."""
        t = self.tensors[key]
        hi = t.rows if hi is None else hi
        buf = torch.empty((hi - lo) * t.row_bytes, dtype=torch.uint8)
        if buf.numel():
            pread_exact(self._fd, memoryview(buf.numpy()), t.begin + lo * t.row_bytes, self.path)
        shape = ((hi - lo),) + t.shape[1:] if t.shape else ()
        return buf.view(t.dtype).reshape(shape)

    def pieces(self, key: str, lo: int = 0, hi: int | None = None):
        """(row offset, rows) pieces of about CHUNK_ELEMENTS elements covering rows [lo, hi)."""
        t = self.tensors[key]
        hi = t.rows if hi is None else hi
        step = max(1, CHUNK_ELEMENTS // max(1, t.row_bytes // t.dtype.itemsize))
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            yield a, self.read(key, a, b)


def need(ckpt: CheckpointFile, key: str) -> Stored:
    try:
        return ckpt.tensors[key]
    except KeyError:
        raise IntegrityError(f"{ckpt.path}: no tensor {key}") from None
