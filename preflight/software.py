"""Software checks: torchao's compiled kernels really loaded, and the versions match the pins.

torchao >= 0.17 loads its C++/CUDA extensions only when torch matches its build; on a mismatch it
logs one line ("Skipping import of cpp extensions" or "Failed to load ..._C_cutlass_90a.abi3.so")
and quietly runs slow paths. That line is easy to miss in a worker's log; this check is not.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from preflight.report import Check, fail, first_line, ok, skipped, warn

FIX = "install torch==2.11.x with torchao==0.18.0 (see requirements/gpu.txt)"
PINS_FILE = Path(__file__).resolve().parent.parent / "requirements" / "gpu.txt"
_PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)")


def torchao_kernels() -> tuple[list[str], list[str]]:
    """(loaded, not loaded) file names of torchao's compiled extensions, by torch's own record.

    torchao loads each `_C*.so` with torch.ops.load_library, which records the real path in
    torch.ops.loaded_libraries; a file missing there was skipped or failed to load.
    """
    import torch
    import torchao

    files = sorted(Path(torchao.__file__).resolve().parent.glob("_C*.so"))
    loaded = {str(Path(p).resolve()) for p in torch.ops.loaded_libraries}
    return [f.name for f in files if str(f) in loaded], [f.name for f in files if str(f) not in loaded]


def check_torchao(precision: str = "int8") -> Check:
    """torchao's version, and whether its compiled extensions loaded (skipped extensions fail, fix named).

    Only INT8 plans use torchao; for the others the check is skipped without importing it (the
    import alone took 4.2-5.4 s of a 5.3 s preflight on H100).
    """
    if precision != "int8":
        return skipped("torchao", f"the {precision} plan does not use torchao (FP8 runs on FP8Linear)")
    try:
        import torchao
    except ImportError as e:
        return fail("torchao", f"torchao does not import ({first_line(e)}): {FIX}")
    version = getattr(torchao, "__version__", "unknown")
    if getattr(torchao, "skip_loading_so_files", False):
        reason = getattr(torchao, "_skip_reason", None) or "skipped"
        return fail("torchao", f"torchao {version} skipped its compiled kernels ({reason}): "
                               f"FP8/INT8 would run slow paths; {FIX}", torchao=version)
    loaded, missing = torchao_kernels()
    if not loaded and not missing:
        return warn("torchao", f"torchao {version} ships no compiled kernels (a source build?)", torchao=version)
    if not loaded:
        return fail("torchao", f"torchao {version} failed to load its compiled kernels ({', '.join(missing)}): "
                               f"FP8/INT8 would run slow paths; {FIX}", torchao=version)
    if missing:
        return warn("torchao", f"torchao {version}: {', '.join(missing)} did not load "
                               f"({len(loaded)} of {len(loaded) + len(missing)} loaded)", torchao=version)
    return ok("torchao", f"torchao {version}, compiled kernels loaded ({', '.join(loaded)})", torchao=version)


def read_pins(path: Path = PINS_FILE) -> dict[str, str]:
    """`name==version` lines of a requirements file, lower-cased names."""
    pins = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def installed_versions(names=("torch", "torchao", "diffusers")) -> dict[str, str]:
    """Installed distribution versions (without importing the packages)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def compare_pins(pins: dict[str, str], installed: dict[str, str]) -> Check:
    """torch (major.minor) and torchao must match the pins: torchao's prebuilt kernels are built against
    one torch; a torch patch release or another diffusers is a warning (measured set differs)."""
    problems, notes = [], []
    torch_pin, torch_have = pins.get("torch"), installed.get("torch", "not installed")
    if torch_pin and _minor(torch_have) != _minor(torch_pin):
        problems.append(f"torch {torch_have} (pinned {torch_pin})")
    elif torch_pin and torch_have.split("+")[0] != torch_pin:
        notes.append(f"torch {torch_have} (pinned {torch_pin})")
    if pins.get("torchao") and installed.get("torchao") not in (pins["torchao"], "not installed"):
        problems.append(f"torchao {installed.get('torchao')} (pinned {pins['torchao']})")
    if pins.get("diffusers") and installed.get("diffusers") != pins["diffusers"]:
        notes.append(f"diffusers {installed.get('diffusers')} (pinned {pins['diffusers']}, measured set)")
    if problems:
        return fail("pins", f"{', '.join(problems + notes)}: torchao's kernels need the torch they were built "
                            f"for; {FIX}")
    if notes:
        return warn("pins", f"{', '.join(notes)}: not the measured set")
    return ok("pins", ", ".join(f"{n} {installed[n]}" for n in ("torch", "torchao", "diffusers") if n in installed))


def check_pins(path: Path = PINS_FILE) -> Check:
    """Installed torch/torchao/diffusers against requirements/gpu.txt."""
    if not path.is_file():
        return warn("pins", f"{path.name} not found next to the package: versions not checked")
    return compare_pins(read_pins(path), installed_versions())
