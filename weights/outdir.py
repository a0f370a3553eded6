"""`--out` of `bake` and `import`: never delete what the command did not create.

The rule: `--out` must be absent, an empty folder, or a previous bake of ours (its manifest.json
parses and every entry under it is a file that manifest lists). Anything else is refused, naming the
folder and the first foreign entries, before any work. The new directory is written to a fresh
temporary sibling (`OUT.partial-XXXX`, created by this run) and swapped in atomically when complete
(Linux `renameat2(RENAME_EXCHANGE)`, else two renames); the old bake is removed only after the swap.
A failed command removes its temporary sibling and any parent folders it created, and leaves OUT
as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from weights import manifest as mf
from weights.errors import OutputExists, WeightsError

RULE = ("--out must be absent, empty, or a previous bake (its manifest.json lists every file in it); "
        "the result is written beside it and swapped in when complete, so nothing else is ever deleted")


def foreign_entries(root: Path, manifest: dict) -> list[str]:
    """Entries under a previous bake that its manifest does not list (symlinks count as foreign)."""
    listed = set(manifest.get("files", {})) | {mf.NAME}
    dirs = {p for f in listed for p in Path(f).parents if str(p) != "."}
    out = []
    for top, subdirs, files in os.walk(root, followlinks=False):
        rel = Path(top).relative_to(root)
        for d in subdirs:
            p = rel / d
            if (root / p).is_symlink() or p not in dirs:
                out.append(p.as_posix() + "/")
        out += [(rel / f).as_posix() for f in files if (rel / f).as_posix() not in listed or (root / rel / f).is_symlink()]
    return sorted(out)


def check(out: str | Path) -> bool:
    """Refuse an `--out` this command may not replace; return whether it holds a previous bake."""
    out = Path(out)
    if out.is_symlink():
        raise OutputExists(f"--out {out} is a symbolic link; give the real folder ({RULE})")
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputExists(f"--out {out} exists and is not a folder ({RULE})")
    if not any(out.iterdir()):
        return False
    try:
        manifest = mf.read(out)
    except WeightsError:
        raise OutputExists(f"--out {out} is not empty and not a previous bake (no manifest.json of ours): "
                           f"refusing to replace it ({RULE})") from None
    foreign = foreign_entries(out, manifest)
    if foreign:
        raise OutputExists(f"--out {out} is a previous bake that also holds files its manifest does not list "
                           f"({', '.join(foreign[:3])}): refusing to replace it ({RULE})")
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success swap it in, on failure remove it."""
    out = Path(out).absolute()
    check(out)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    try:
        yield tmp
        replacing = check(out)  # again: the folder may have changed during a long bake
        if replacing:
            if not _exchange(tmp, out):
                old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
                os.rename(out, old / out.name)
                os.rename(tmp, out)
                tmp = old
            shutil.rmtree(tmp)  # the previous bake, every file of it listed in its manifest
        else:
            try:
                os.rename(tmp, out)  # onto an absent or empty folder
            except OSError as e:
                raise OutputExists(f"--out {out}: cannot move the result into place ({e.strerror}; a mount "
                                   "point? give a folder inside it)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # nearest first; only folders this run made, and only if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
