"""LoRA files on local disk, named by the sha256 of their bytes, least recently used evicted past a size.

`get(source, fetch, sha256, field)` answers from disk when the job's `sha256` names a stored file, or when
this source was fetched before (an index from the sha256 of the source string to the content's: the
source itself, which may carry a presigned signature, is never written down). A source is treated as
immutable: a new file needs a new URL (or its sha256 in the job, which is checked after the fetch).
Only files this cache wrote (`<64 hex>.safetensors`, `sources/<64 hex>`) are ever removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from loguru import logger

from app.errors import InvalidInput

_NAME = re.compile(r"^[0-9a-f]{64}\.safetensors$")


class LoraCache:
    def __init__(self, root: str | Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        (self.root / "sources").mkdir(parents=True, exist_ok=True)

    def file(self, sha: str) -> Path:
        return self.root / f"{sha}.safetensors"

    def get(self, source: str, fetch: Callable[[], bytes], sha256: str | None = None,
            field: str = "loras") -> tuple[str, Path, bool]:
        """(content sha256, its file, whether it was on disk already)."""
        index = self.root / "sources" / hashlib.sha256(source.encode()).hexdigest()
        sha = sha256 or _read_text(index)
        if sha and self.file(sha).is_file():
            os.utime(self.file(sha))  # the LRU order is the files' mtimes
            if not sha256:
                return sha, self.file(sha), True
            _write_atomic(index, sha.encode())
            return sha, self.file(sha), True
        data = fetch()
        got = hashlib.sha256(data).hexdigest()
        if sha256 and got != sha256:
            raise InvalidInput(f"{field}: the file's sha256 is {got}, not the {sha256} the job gave", field=field)
        if not self.file(got).is_file():
            _write_atomic(self.file(got), data)
            self._evict(keep=got)
        else:
            os.utime(self.file(got))
        _write_atomic(index, got.encode())
        return got, self.file(got), False

    def _evict(self, keep: str) -> None:
        files = sorted((p for p in self.root.iterdir() if _NAME.match(p.name)), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.max_bytes:
                break
            if p.name.startswith(keep):
                continue
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
            logger.info("LoRA cache: evicted {} (LORA_CACHE_MB reached)", p.name[:16])


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text if re.fullmatch(r"[0-9a-f]{64}", text) else None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write then rename: a crash mid-write never leaves a truncated file under a content name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
