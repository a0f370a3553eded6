"""`python -m weights inspect PATH`: what a baked directory or a single checkpoint file holds.

Reads headers only for baked directories (no tensor data); a single file is read through the
same checks the importer runs (a piece at a time), so a missing or zero scale, a NaN code or a
stripped-scale file shows up here as `usable: false` before an import is attempted. Named
`inspection`, not `inspect`, so it never shadows the standard library's module.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from weights import formats
from weights import manifest as mf
from weights.errors import WeightsError
from weights.checkpoint import CheckpointFile
from weights.fp8 import FLOAT8
from weights.serialize import _NAMES, read_file_header


def _header(path: Path) -> dict:
    return read_file_header(path)[0]


def inspect_baked(root: Path) -> dict:
    """Recipe, dtypes and quantized layers of a baked directory, from the safetensors headers.

    FP8 layers are counted from the tensors themselves (an e4m3 `.weight` with its `.weight_scale`
    beside it), int8 ones from torchao's type records in the header.
    """
    manifest = mf.read(root)
    dtypes, types, den = Counter(), Counter(), {}
    for name in manifest["files"]:
        if not name.endswith(".safetensors"):
            continue
        header = _header(root / name)
        meta = header.pop("__metadata__", {}) or {}
        dtypes.update(info["dtype"] for info in header.values())
        if name.startswith(manifest["denoiser"] + "/"):
            den.update({k: info["dtype"] for k, info in header.items()})
            if "tensor_names" in meta:
                types.update(json.loads(meta[k])["_type"] for k in json.loads(meta["tensor_names"]))
    fp8 = [k for k, d in den.items() if d == "F8_E4M3" and k.endswith(".weight")]
    unscaled = sorted(k for k in fp8 if den.get(k.removesuffix(".weight") + ".weight_scale") != "F32")
    return {"path": str(root), "format": f"baked ({manifest['recipe']['precision']})", "source": manifest["source"],
            "recipe": manifest["recipe"], "versions": manifest["versions"], "files": len(manifest["files"]),
            "weights_bytes": manifest["weights_bytes"], "dtypes": dict(dtypes),
            "fp8_weights": len(fp8), "fp8_weights_with_scale": len(fp8) - len(unscaled), "unscaled": unscaled[:10],
            "denoiser_tensor_types": dict(types), "quantized_layers": len(fp8) + types.get("Int8Tensor", 0)}


def inspect_file(path: Path) -> dict:
    """Format, dtypes, FP8 layer count and scale coverage of a single checkpoint file, and whether the
    importer would take it (the same checks: scales, codes, NaN/inf, duplicates; no conversion)."""
    with CheckpointFile(path) as ckpt:
        tensors = ckpt.tensors
        fmt = formats.detect(list(tensors), {k: t.dtype for k, t in tensors.items()}, ckpt.metadata)
        dtypes = Counter(_NAMES.get(t.dtype, str(t.dtype)) for t in tensors.values())
        fp8 = [k for k, t in tensors.items() if t.dtype in FLOAT8 and k.endswith(".weight")]
        scaled = [k for k in fp8 if formats.scale_key(k, fmt) in tensors]
        report = {"path": str(path), "format": fmt, "dtypes": dict(dtypes), "fp8_weights": len(fp8),
                  "fp8_weights_with_scale": len(scaled), "unscaled": sorted(set(fp8) - set(scaled))[:10]}
        try:
            plan = formats.read_plan(ckpt)
            report.update(usable=True, scales=dict(plan.notes))
        except WeightsError as e:
            report.update(usable=False, problem=e.message)
    return report


def inspect_path(path: str | Path) -> dict:
    p = Path(path)
    return inspect_baked(p) if p.is_dir() else inspect_file(p)
