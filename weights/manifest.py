"""manifest.json: what a baked directory holds, how it was made, and the hash of every byte.

Each file has its size, its sha256 and the sha256 of each 64 MiB chunk. `verify` checks whole-file
hashes; the S3 stream checks chunk hashes as the ranged reads arrive, in parallel, so hashing does
not serialize a multi-GB download.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loguru import logger

from weights.errors import IntegrityError

NAME = "manifest.json"
FORMAT = "diffusion-worker/baked"
# v2: FP8 denoisers as FP8Linear plain tensors (v1 held torchao Float8Tensor layouts: re-bake those).
VERSION = 2
HASH_CHUNK_BYTES = 64 << 20
READ_BYTES = 4 << 20


def file_digest(path: Path, chunk: int | None = None) -> dict:
    """{"size", "sha256", "chunks": [sha256 of each chunk]} of one file, read READ_BYTES at a time (the
    threads of `digest_tree` each hold one such buffer, not a whole chunk)."""
    chunk = chunk or HASH_CHUNK_BYTES
    whole, chunks, size = hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        while True:
            part, left = hashlib.sha256(), chunk
            while left and (block := f.read(min(READ_BYTES, left))):
                whole.update(block)
                part.update(block)
                left -= len(block)
            if left == chunk:
                break
            chunks.append(part.hexdigest())
            size += chunk - left
            if left:
                break
    return {"size": size, "sha256": whole.hexdigest(), "chunks": chunks}


def list_files(root: Path) -> list[str]:
    """Every file under `root` except the manifest, as sorted POSIX relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != NAME)


def digest_tree(root: Path) -> dict[str, dict]:
    """file_digest of every file under `root` (hashlib releases the GIL: threads hash in parallel)."""
    files = list_files(root)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(files, pool.map(lambda f: file_digest(root / f), files)))


def versions() -> dict:
    """Installed versions of the libraries a baked directory depends on (None when not installed:
    an FP8 or bf16 bake needs neither torchao nor transformers to be read back)."""
    from importlib import metadata

    out = {}
    for name in ("torch", "torchao", "diffusers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write(root: Path, body: dict) -> dict:
    """Hash every file under `root` and write manifest.json with `body` (source, recipe, ...)."""
    files = digest_tree(root)
    weights_bytes = sum(f["size"] for n, f in files.items() if n.endswith(".safetensors"))
    manifest = {"format": FORMAT, "version": VERSION, **body, "versions": versions(),
                "chunk_bytes": HASH_CHUNK_BYTES,
                "weights_bytes": weights_bytes, "files": files}
    (root / NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def read(root: Path) -> dict:
    """The manifest of a baked directory; IntegrityError if absent or not ours."""
    path = Path(root) / NAME
    if not path.is_file():
        raise IntegrityError(f"{root}: no {NAME} (not a baked directory)")
    return parse(path.read_bytes(), str(path))


def parse(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data)
    except ValueError:
        raise IntegrityError(f"{where}: not valid JSON") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise IntegrityError(f"{where}: format {manifest.get('format')!r} v{manifest.get('version')} "
                             f"is not {FORMAT} v{VERSION} (re-bake it with `python -m weights bake`)")
    return manifest


def check_sizes(root: Path, manifest: dict) -> None:
    """Cheap load-time check: every file present with its recorded size (catches truncation)."""
    for name, info in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise IntegrityError(f"{root}: {name} listed in the manifest is missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise IntegrityError(f"{root}: {name} has {size} bytes, the manifest says {info['size']} (truncated?)")


def verify(root: Path) -> dict:
    """Check sizes and sha256 of every file against the manifest; return a summary or raise."""
    root = Path(root)
    manifest = read(root)
    check_sizes(root, manifest)
    actual = digest_tree(root)
    for name, info in manifest["files"].items():
        if actual[name]["sha256"] != info["sha256"]:
            raise IntegrityError(f"{root}: {name} sha256 {actual[name]['sha256'][:16]}... differs from the "
                                 f"manifest's {info['sha256'][:16]}... (altered)")
    extra = sorted(set(actual) - set(manifest["files"]))
    if extra:
        logger.warning("{}: files not in the manifest (ignored): {}", root, extra[:5])
    return {"ok": True, "files": len(manifest["files"]), "bytes": sum(i["size"] for i in manifest["files"].values()),
            "unlisted": extra}
