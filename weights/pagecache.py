"""The kernel's page cache for weight files: ask it to read ahead (`prefetch`), or to forget (`drop_cache`).

`prefetch` is the start-up overlap: `posix_fadvise(POSIX_FADV_WILLNEED)` per file queues the reads in
the kernel, which fills the page cache while Python imports diffusers and runs preflight. The call
holds no GIL (a reader thread beside the imports lost to it, docs/speed.md), and it runs on a thread
of its own only because queueing a large file's reads can block the caller. It is advice: a
filesystem or platform without fadvise costs nothing but the overlap, never the load.

`drop_cache` is for the benchmarks' "cold disk" runs: the files' pages are written back and evicted
(POSIX_FADV_DONTNEED per file), and as root the whole page cache goes too (/proc/sys/vm/drop_caches).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable

from loguru import logger

SUFFIXES = (".safetensors", ".bin", ".gguf")  # the files whose bytes a load reads in bulk


def weight_files(root: str | Path) -> list[Path]:
    """Every weights file under the folder `root` (sorted; nothing for a non-folder: a hub id, an s3:// URI)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file())


def advise(paths: Iterable[Path], advice_name: str) -> int:
    """`posix_fadvise(advice)` over each whole file; how many files took it (failures are logged at DEBUG)."""
    fadvise = getattr(os, "posix_fadvise", None)
    advice = getattr(os, advice_name, None)
    if fadvise is None or advice is None:
        logger.debug("page cache: no {} on this platform", advice_name)
        return 0
    done = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if advice_name == "POSIX_FADV_DONTNEED":
                    os.fsync(fd)  # dirty pages (a file just written) are not evicted until written back
                fadvise(fd, 0, 0, advice)
                done += 1
            finally:
                os.close(fd)
        except OSError as e:  # no fadvise on this filesystem (EINVAL, ESPIPE), or a file gone
            logger.debug("page cache: {} on {} failed: {}", advice_name, path, e)
    return done


def prefetch(root: str | Path, wait: bool = False) -> threading.Thread | None:
    """Ask the kernel to read every weights file under `root` ahead, on a daemon thread (joined when
    `wait`); None when there is nothing to read. Never raises."""
    try:
        paths = weight_files(root)
    except OSError as e:
        logger.debug("page cache: cannot list {}: {}", root, e)
        return None
    if not paths:
        return None

    def run() -> None:
        try:
            n = advise(paths, "POSIX_FADV_WILLNEED")
            logger.debug("page cache: read-ahead queued for {} of {} weights files", n, len(paths))
        except Exception as e:  # advice only: a surprise here must not reach the load
            logger.debug("page cache: read-ahead failed: {}", e)

    thread = threading.Thread(target=run, name="weights-readahead", daemon=True)
    thread.start()
    if wait:
        thread.join()
    return thread


def drop_cache(root: str | Path) -> str:
    """Evict the weights files under `root` from the page cache; says how it was done."""
    paths = weight_files(root) if Path(root).is_dir() else [Path(root)]
    done = advise(paths, "POSIX_FADV_DONTNEED")
    method = f"fsync + posix_fadvise DONTNEED on {done} of {len(paths)} files"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            method += " + /proc/sys/vm/drop_caches"
        except OSError as e:  # a container without a writable /proc/sys
            method += f" (drop_caches refused: {e.strerror})"
    return method
