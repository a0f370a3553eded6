"""FP8 single-file checkpoints as published, checked before a byte is converted.

Formats recognised (dequantized weight = stored value x scale in all of them):
  comfyui-legacy      `<layer>.scale_weight` per layer (Kijai's WanVideo_comfy_fp8_scaled files, ComfyUI's
                      `scaled_fp8` marker files), optional `scale_input`
  comfyui             `<layer>.weight_scale`, optional `input_scale`, and a `<layer>.comfy_quant` JSON
                      tensor or a `_quantization_metadata` JSON in the safetensors header
  compressed-tensors  `<layer>.weight_scale`, per-tensor (`[1]`) or per-channel (`[out, 1]`)
  fp8-unscaled        FP8 tensors and no scale at all: a plain cast (accepted, scale 1) or a scaled file
                      whose scales were stripped (refused); told apart by the codes (PLAIN_CAST_MAX_CODE)
Scales may be scalars, `[out]`/`[out, 1]` or per-block `[ceil(out/b0), ceil(in/b1)]`: the shape is
checked against the weight, never assumed; their dtype must be a real float and every value finite and
> 0. Every float8 dtype torch knows has a rule here (FP8_RULES) or is refused by name, and every
float tensor is read once (a piece at a time) before conversion: NaN or infinite values, FP8 NaN/inf
encodings included, are refused naming the tensor. Activation scales (`scale_input`, `input_scale`)
are static-activation hints; the recipe quantizes activations dynamically per row, so they are
counted and not used.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from weights.checkpoint import CheckpointFile, Stored
from weights.errors import BadScale, BadValues, MissingScale, UnknownFormat
from weights.fp8 import E4M3, FLOAT8

# How each float8 dtype's codes become numbers: "keep" (e4m3fn with per-tensor/per-channel scales:
# the codes are kept bit for bit) or "decode" (torch's own decoding of that format x scale, then
# re-quantized per row to e4m3fn). A float8 dtype missing here is refused by name.
FP8_RULES = {torch.float8_e4m3fn: "keep", torch.float8_e5m2: "decode",
             torch.float8_e4m3fnuz: "decode", torch.float8_e5m2fnuz: "decode"}
REFUSED_FP8 = {torch.float8_e8m0fnu: "an exponent-only scale format (MX block scales), not weights"}
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Plain cast vs stripped scales: a plain cast's codes are the weights themselves, and trained diffusion
# transformer weights stay far below 64 in magnitude; codes scaled to e4m3's range reach 448 (e5m2: 57344).
PLAIN_CAST_MAX_CODE = 64.0
_ACT_SCALES = (".scale_input", ".input_scale")
_SCALES = (".scale_weight", ".weight_scale")
_MARKERS = ("scaled_fp8",)
MAX_COMFY_QUANT_BYTES = 1 << 16


def detect(keys, dtypes: dict, metadata: dict) -> str:
    """The format name, from marker tensors and scale key names (never from the file name)."""
    if "scaled_fp8" in keys or any(k.endswith(".scale_weight") for k in keys):
        return "comfyui-legacy"
    if any(k.endswith(".comfy_quant") for k in keys) or "_quantization_metadata" in metadata:
        return "comfyui"
    if any(k.endswith(".weight_scale") for k in keys):
        return "compressed-tensors"
    if any(d in FLOAT8 for d in dtypes.values()):
        return "fp8-unscaled"
    return "plain"


def scale_key(weight_key: str, fmt: str) -> str:
    layer = weight_key.removesuffix(".weight")
    return f"{layer}.scale_weight" if fmt == "comfyui-legacy" else f"{layer}.weight_scale"


@dataclass
class Source:
    """One weight-bearing tensor of the file and how its values are recovered."""

    stored: Stored
    kind: str  # plain | per-tensor | per-channel | per-block | plain-cast (FP8 codes, scale 1)
    scale: torch.Tensor | None = None  # fp32, the file's shape

    @property
    def bit_exact(self) -> bool:
        """Its codes can be kept as they are in an FP8Linear (e4m3fn, one scale per row, 2-D)."""
        return (self.stored.dtype == E4M3 and len(self.stored.shape) == 2
                and self.kind in ("per-tensor", "per-channel", "plain-cast"))

    def row_scale(self, lo: int, hi: int) -> torch.Tensor:
        """[hi - lo, 1] fp32 scales of a bit-exact source's rows."""
        if self.kind == "plain-cast":
            return torch.ones(hi - lo, 1)
        s = self.scale.reshape(-1)
        return (s.expand(hi - lo) if s.numel() == 1 else s[lo:hi]).reshape(hi - lo, 1).clone()

    def values(self, rows: torch.Tensor, lo: int) -> torch.Tensor:
        """fp32 values of stored rows `rows` starting at row `lo`: decoded codes x scale."""
        v = rows.to(torch.float32)
        if self.scale is None or self.kind == "plain-cast":
            return v
        s = self.scale.to(torch.float32)
        if self.kind == "per-block":
            b0, b1 = _block_sizes(self.stored.shape, s.shape)
            grid = s[torch.arange(lo, lo + v.shape[0]) // b0].repeat_interleave(b1, 1)
            return v * grid[:, : v.shape[1]]
        if s.numel() == 1:
            return v * s.reshape(())
        return v * s.reshape((-1,) + (1,) * (v.dim() - 1))[lo:lo + v.shape[0]]


@dataclass
class Plan:
    format: str
    sources: dict[str, Source] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)  # scale kinds, dtypes converted, activation scales


def _block_sizes(wshape, sshape) -> tuple[int, int] | None:
    if len(wshape) != 2 or len(sshape) != 2 or 0 in sshape:
        return None
    b0, b1 = math.ceil(wshape[0] / sshape[0]), math.ceil(wshape[1] / sshape[1])
    ok = math.ceil(wshape[0] / b0) == sshape[0] and math.ceil(wshape[1] / b1) == sshape[1]
    return (b0, b1) if ok else None


def _scale(ckpt: CheckpointFile, key: str, skey: str, fmt: str) -> tuple[str, torch.Tensor]:
    """(kind, fp32 scale) of weight `key` from its scale tensor `skey`, after every check."""
    st, w = ckpt.tensors[skey], ckpt.tensors[key]
    if st.dtype not in SCALE_DTYPES:
        raise BadScale(f"{ckpt.path}: {st.raw}: scale of {w.raw} is {st.dtype}, not a float (relabelled header?)"
                       f" in a {fmt} checkpoint")
    s = ckpt.read(skey).to(torch.float32)
    bad = ~(torch.isfinite(s) & (s > 0))
    if bad.any():
        where = "the whole scale" if bad.all() else f"{int(bad.sum())} of {s.numel()} values"
        raise BadScale(f"{ckpt.path}: {st.raw}: scale of {w.raw} has zero, negative or non-finite values "
                       f"({where}) in a {fmt} checkpoint")
    out = w.shape[0] if w.shape else 1
    if s.numel() == 1:
        return "per-tensor", s
    if tuple(s.shape) in ((out,), (out, 1)):
        return "per-channel", s
    if _block_sizes(w.shape, s.shape) is not None:
        return "per-block", s
    raise BadScale(f"{ckpt.path}: {w.raw}: scale shape {list(s.shape)} does not fit weight {list(w.shape)} "
                   f"(expected a scalar, [{out}], [{out}, 1] or a per-block grid) in a {fmt} checkpoint")


def _layer_formats(ckpt: CheckpointFile) -> dict[str, str]:
    """ComfyUI's per-layer quantization format, from `comfy_quant` tensors or the header."""
    from weights.checkpoint import strip

    out = {}
    raw = ckpt.metadata.get("_quantization_metadata")
    try:
        if raw:
            layers = json.loads(raw).get("layers", {})
            out.update({strip(k): (v.get("format") if isinstance(v, dict) else str(v)) for k, v in layers.items()})
    except (ValueError, AttributeError):
        raise UnknownFormat(f"{ckpt.path}: comfyui: _quantization_metadata in the header is not valid JSON") from None
    for key, t in ckpt.tensors.items():
        if key.endswith(".comfy_quant"):
            try:
                if t.rows * t.row_bytes > MAX_COMFY_QUANT_BYTES:
                    raise ValueError
                out[key.removesuffix(".comfy_quant")] = json.loads(bytes(ckpt.read(key).view(torch.uint8).tolist())).get("format")
            except (ValueError, AttributeError, RuntimeError):
                raise UnknownFormat(f"{ckpt.path}: comfyui: {t.raw} is not a JSON comfy_quant tensor") from None
    return out


def plan(ckpt: CheckpointFile) -> Plan:
    """Classify every tensor and check every scale; raise a WeightsError naming the tensor."""
    keys = ckpt.tensors
    fmt = detect(list(keys), {k: t.dtype for k, t in keys.items()}, ckpt.metadata)
    layer_fmt = _layer_formats(ckpt) if fmt == "comfyui" else {}
    p = Plan(fmt)
    aux = {k for k in keys if k.endswith(_SCALES + _ACT_SCALES + (".comfy_quant",)) or k in _MARKERS}
    for key in sorted(set(keys) - aux):
        t = keys[key]
        if t.dtype in FLOAT8 and t.dtype not in FP8_RULES:
            why = REFUSED_FP8.get(t.dtype, "a float8 format this importer has no rule for")
            raise UnknownFormat(f"{ckpt.path}: {t.raw} is {t.dtype}: {why}; refusing to use its codes as numbers")
        if not t.dtype.is_floating_point:
            if key.endswith(".weight"):
                raise UnknownFormat(f"{ckpt.path}: {t.raw}: {t.dtype} weight in a {fmt} checkpoint; only FP8 "
                                    "quantization is supported")
            p.sources[key] = Source(t, "plain")
            continue
        lf = layer_fmt.get(key.removesuffix(".weight"))
        if lf is not None and not str(lf).startswith("float8"):
            raise UnknownFormat(f"{ckpt.path}: {t.raw}: layer format {lf!r} in a {fmt} checkpoint; only FP8 is supported")
        skey = scale_key(key, fmt) if key.endswith(".weight") else None
        if skey in keys:
            kind, s = _scale(ckpt, key, skey, fmt)
            p.sources[key] = Source(t, kind, s)
            p.notes[kind] += 1
        elif t.dtype in FLOAT8 and fmt != "fp8-unscaled":
            raise MissingScale(f"{ckpt.path}: {t.raw}: FP8 weight without its scale ({skey}) in a {fmt} checkpoint; "
                               "refusing to use raw FP8 codes as weights (they would generate noise)")
        else:
            p.sources[key] = Source(t, "plain-cast" if t.dtype in FLOAT8 else "plain")
        if t.dtype in FLOAT8 and t.dtype != E4M3:
            p.notes[f"{t.dtype} decoded".replace("torch.", "")] += 1
    for key in aux:
        layer = key.rsplit(".", 1)[0]
        if key.endswith(_SCALES) and f"{layer}.weight" not in p.sources:
            raise UnknownFormat(f"{ckpt.path}: {keys[key].raw}: a scale without its weight {layer}.weight")
        if key.endswith(_ACT_SCALES):
            p.notes["activation scales ignored (dynamic per-row activations)"] += 1
    if not p.sources:
        raise UnknownFormat(f"{ckpt.path}: no tensors")
    return p


def validate(ckpt: CheckpointFile, p: Plan) -> None:
    """Read every float tensor once, a piece at a time: refuse NaN/inf values (FP8 NaN codes too), and
    decide each unscaled FP8 tensor: plain cast (codes within PLAIN_CAST_MAX_CODE) or stripped scales."""
    for key, src in p.sources.items():
        if not src.stored.dtype.is_floating_point:
            continue
        amax = 0.0
        for lo, rows in ckpt.pieces(key):
            v = rows.to(torch.float32)
            finite = torch.isfinite(v)
            if not finite.all():
                row = lo + int((~finite).reshape(v.shape[0] if v.dim() else 1, -1).any(1).nonzero()[0])
                what = "NaN/inf codes" if src.stored.dtype in FLOAT8 else "NaN/inf values"
                raise BadValues(f"{ckpt.path}: {src.stored.raw} holds {what} (row {row}); refusing weights that "
                                "would make the denoiser output NaN")
            if v.numel():
                amax = max(amax, float(v.abs().max()))
        if src.kind == "plain-cast":
            if amax > PLAIN_CAST_MAX_CODE:
                raise MissingScale(
                    f"{ckpt.path}: {src.stored.raw}: FP8 codes reach {amax:g} but the file has no scales: a scaled "
                    f"checkpoint whose scales were stripped (a plain cast's codes are the weights, below "
                    f"{PLAIN_CAST_MAX_CODE:g}); refusing to use raw FP8 codes as weights")
            p.notes["plain-cast"] += 1


def read_plan(ckpt: CheckpointFile) -> Plan:
    """`plan` + `validate`: everything checked, nothing converted yet."""
    p = plan(ckpt)
    validate(ckpt, p)
    return p
