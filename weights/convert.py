"""Map a checked checkpoint onto the baked skeleton and produce its tensors a piece at a time.

Every tensor of the skeleton (names, dtypes and shapes from the meta model, fused and quantized as
the bake does) is the concatenation along dim 0 of row ranges of source tensors ("segments"): a
key module's row ranges (FLUX's split qkv, the AdaLN swap), then fused projections as the
concatenation of their parts (`weights.quantize.FUSED`). The geometry is checked for every tensor
before anything is written: rows add up, trailing dimensions match, and every source tensor is used
exactly once, row for row. Then `produce(name)` yields the tensor in row pieces: e4m3 codes with
per-row scales are copied bit for bit; anything else is decoded (codes x scale, exact in fp32) and
re-quantized per row (`quantize_rows`, what `bake` does) or cast to the skeleton's dtype. Per-row
quantization is row-independent, so pieces give the same bytes as the whole layer.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from weights.checkpoint import CheckpointFile
from weights.errors import UnknownFormat
from weights.fp8 import E4M3, quantize_rows
from weights.formats import Plan
from weights.quantize import FUSED

Segment = tuple[str, int, int]  # (source key, first row, end row)


def segments(entries, ckpt: CheckpointFile, plan: Plan) -> dict[str, list[Segment]]:
    """diffusers key -> its segments, from a key module's (diffusers_key, source_key, rows) entries."""
    out, missing = {}, []
    for d, b, rows in entries:
        if b not in plan.sources:
            missing.append(b)
            continue
        n = ckpt.tensors[b].rows
        if rows is None:
            out[d] = [(b, 0, n)]
        elif rows == "swap":
            out[d] = [(b, n // 2, n), (b, 0, n // 2)]
        else:
            out[d] = [(b, rows[0], rows[1])]
    if missing:
        raise UnknownFormat(f"{ckpt.path}: {plan.format}: checkpoint lacks {len(missing)} tensors the key map "
                            f"needs, e.g. {sorted(missing)[:3]}")
    return out


def _with_fused(name: str, segs: dict) -> list[Segment] | None:
    layer, _, suffix = name.rpartition(".")
    attn, _, fused = layer.rpartition(".")
    parts = FUSED.get(fused)
    if parts and all(f"{attn}.{p}.{suffix}" in segs for p in parts):
        return [s for p in parts for s in segs.pop(f"{attn}.{p}.{suffix}")]
    return None


def layout(expected: dict, segs: dict, ckpt: CheckpointFile, plan: Plan) -> dict[str, list[Segment]]:
    """Output name -> segments for every skeleton tensor, geometry checked; refuse what does not fit."""
    segs = dict(segs)
    got, missing = {}, []
    derived = {f"{n.removesuffix('.weight')}.weight_scale" for n, (d, _) in expected.items() if d == E4M3}
    for name in expected:
        if name in derived:  # an FP8 layer's scales: produced with its codes
            continue
        s = segs.pop(name, None) or _with_fused(name, segs)
        if s is None:
            missing.append(name)
        got[name] = s
    if missing or segs:
        raise UnknownFormat(f"{ckpt.path}: {plan.format}: checkpoint lacks {len(missing)} tensors, e.g. "
                            f"{sorted(missing)[:3]}, and has {len(segs)} the model does not, e.g. "
                            f"{sorted(segs[k][0][0] for k in list(segs)[:3])}")
    used = defaultdict(int)
    for name, (dtype, shape) in expected.items():
        if name in derived:
            continue
        rows = shape[0] if shape else 1
        for b, lo, hi in got[name]:
            t = ckpt.tensors[b]
            if t.shape[1:] != shape[1:] or len(t.shape) != len(shape) or not 0 <= lo <= hi <= t.rows:
                raise UnknownFormat(f"{ckpt.path}: {t.raw} has shape {list(t.shape)}, the model's {name} needs "
                                    f"{list(shape)} (another geometry than the config? pass --config)")
            used[b] += hi - lo
        if sum(hi - lo for _, lo, hi in got[name]) != rows:
            raise UnknownFormat(f"{ckpt.path}: {got[name][0][0]} and its parts give {name} "
                                f"{sum(h - l for _, l, h in got[name])} rows, the model needs {list(shape)}")
    unused = sorted(set(plan.sources) - set(used))
    if unused:
        raise UnknownFormat(f"{ckpt.path}: {plan.format}: {len(unused)} tensors the model does not have, e.g. "
                            f"{[ckpt.tensors[k].raw for k in unused[:3]]}")
    for b, n in used.items():
        if n != ckpt.tensors[b].rows:
            raise UnknownFormat(f"{ckpt.path}: {ckpt.tensors[b].raw} has {ckpt.tensors[b].rows} rows, the model "
                                f"uses {n} of them (another geometry than the config? pass --config)")
    return got


class Producer:
    """`produce(name)` yields a skeleton tensor's bytes in pieces; counts kept and re-quantized layers."""

    def __init__(self, ckpt: CheckpointFile, plan: Plan, plan_out: dict, expected: dict, fp8_layers: set[str]):
        self.ckpt, self.plan, self.segs, self.expected, self.fp8 = ckpt, plan, plan_out, expected, fp8_layers
        self._scales: dict[str, list[torch.Tensor]] = {}
        self.kept = self.requantized = 0

    def order(self) -> list[str]:
        """Write order: sorted, so every FP8 `X.weight` comes before its `X.weight_scale`."""
        return sorted(self.expected)

    def __call__(self, name: str):
        dtype, _ = self.expected[name]
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight_scale") and module in self.fp8:
            yield from self._scales.pop(module)
        elif name.endswith(".weight") and module in self.fp8:
            yield from self._fp8(module, name)
        else:
            for b, lo, hi in self.segs[name]:
                src = self.plan.sources[b]
                for at, rows in self.ckpt.pieces(b, lo, hi):
                    if not dtype.is_floating_point or not rows.dtype.is_floating_point:
                        if rows.dtype != dtype:
                            raise UnknownFormat(f"{self.ckpt.path}: {src.stored.raw} is {rows.dtype}, the model's "
                                                f"{name} is {dtype}")
                        yield rows
                    else:
                        yield src.values(rows, at).to(dtype)

    def _fp8(self, module: str, name: str):
        scales, exact = [], True
        for b, lo, hi in self.segs[name]:
            src = self.plan.sources[b]
            for at, rows in self.ckpt.pieces(b, lo, hi):
                if src.bit_exact:  # per-row e4m3 codes: the bytes as published
                    yield rows.view(E4M3)
                    scales.append(src.row_scale(at, at + rows.shape[0]))
                else:  # decoded exactly (codes x scale, fp32), re-quantized per row
                    exact = False
                    codes, s = quantize_rows(src.values(rows, at))
                    yield codes
                    scales.append(s)
        self._scales[module] = scales
        self.kept += exact
        self.requantized += not exact
