"""FP8 single-file checkpoints as published, read without ever using raw FP8 codes as numbers.

Formats recognised (dequantized weight = FP8 codes x scale in all of them):
  comfyui-legacy      `scaled_fp8` marker tensor, per-layer `<layer>.scale_weight`, optional `scale_input`
  comfyui             `<layer>.weight_scale`, optional `input_scale`, and a `<layer>.comfy_quant` JSON
                      tensor or a `_quantization_metadata` JSON in the safetensors header
  compressed-tensors  `<layer>.weight_scale`, per-tensor (`[1]`) or per-channel (`[out, 1]`)
Scales may be scalars, `[out]`/`[out, 1]` or per-block `[ceil(out/b0), ceil(in/b1)]`: the shape is
checked against the weight, never assumed. An FP8 weight without its scale is refused, naming the
tensor and the format. Activation scales (`scale_input`, `input_scale`) are static-activation hints;
our recipe quantizes activations dynamically per row, so they are read, reported and not used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weights.errors import BadScale, MissingScale, UnknownFormat

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_ACT_SCALES = (".scale_input", ".input_scale")
_MARKERS = ("scaled_fp8",)


@dataclass
class Checkpoint:
    """A single-file checkpoint split into plain tensors and (codes, per-row scale) pairs."""

    format: str
    plain: dict[str, torch.Tensor] = field(default_factory=dict)  # BFL name -> tensor
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # BFL weight name -> float8 codes
    row_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # BFL weight name -> [out, 1] fp32
    notes: dict[str, int] = field(default_factory=dict)  # counts: per-tensor, per-channel, per-block...

    def count(self, what: str) -> None:
        self.notes[what] = self.notes.get(what, 0) + 1


def strip(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def detect(keys: list[str], dtypes: dict[str, torch.dtype], metadata: dict) -> str:
    """The format name, from marker tensors and scale key names (never from the file name)."""
    if "scaled_fp8" in keys or any(k.endswith(".scale_weight") for k in keys):
        return "comfyui-legacy"
    if any(k.endswith(".comfy_quant") for k in keys) or "_quantization_metadata" in metadata:
        return "comfyui"
    if any(k.endswith(".weight_scale") for k in keys):
        return "compressed-tensors"
    if any(d in FP8 for d in dtypes.values()):
        return "fp8-unscaled"
    return "plain"


def scale_key(weight_key: str, fmt: str) -> str:
    layer = weight_key.removesuffix(".weight")
    return f"{layer}.scale_weight" if fmt == "comfyui-legacy" else f"{layer}.weight_scale"


def layer_formats(tensors: dict, metadata: dict) -> dict[str, str]:
    """ComfyUI's per-layer quantization format, from `comfy_quant` tensors or the header."""
    out = {}
    raw = metadata.get("_quantization_metadata")
    if raw:
        try:
            layers = json.loads(raw).get("layers", {})
        except (ValueError, AttributeError):
            raise UnknownFormat("comfyui: _quantization_metadata in the header is not valid JSON") from None
        out.update({strip(k): (v.get("format") if isinstance(v, dict) else str(v)) for k, v in layers.items()})
    for key, t in tensors.items():
        if key.endswith(".comfy_quant"):
            try:
                out[key.removesuffix(".comfy_quant")] = json.loads(bytes(t.to(torch.uint8).tolist())).get("format")
            except (ValueError, AttributeError):
                raise UnknownFormat(f"comfyui: {key} is not a JSON comfy_quant tensor") from None
    return out


def row_scale(weight_key: str, codes: torch.Tensor, scale: torch.Tensor, fmt: str, ckpt: Checkpoint):
    """`[out, 1]` fp32 scales for per-tensor/per-channel, or None for per-block (caller dequantizes)."""
    out_f, in_f = codes.shape
    s = scale.to(torch.float32)
    if not torch.isfinite(s).all() or (s < 0).any():
        raise BadScale(f"{weight_key}: scale has non-finite or negative values ({fmt})")
    if s.numel() == 1:
        ckpt.count("per-tensor")
        return s.reshape(1, 1).expand(out_f, 1).clone()
    if tuple(s.shape) in ((out_f,), (out_f, 1)):
        ckpt.count("per-channel")
        return s.reshape(out_f, 1).clone()
    if s.dim() == 2 and _block_sizes(codes.shape, s.shape) is not None:
        return None
    raise BadScale(f"{weight_key}: scale shape {list(s.shape)} does not fit weight {[out_f, in_f]} "
                   f"(expected a scalar, [{out_f}], [{out_f}, 1] or a per-block grid) in a {fmt} checkpoint")


def _block_sizes(wshape, sshape) -> tuple[int, int] | None:
    b0, b1 = math.ceil(wshape[0] / sshape[0]), math.ceil(wshape[1] / sshape[1])
    ok = math.ceil(wshape[0] / b0) == sshape[0] and math.ceil(wshape[1] / b1) == sshape[1]
    return (b0, b1) if ok else None


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes x per-block scale, in fp32."""
    b0, b1 = _block_sizes(codes.shape, scale.shape)
    full = scale.to(torch.float32).repeat_interleave(b0, 0).repeat_interleave(b1, 1)
    return codes.to(torch.float32) * full[: codes.shape[0], : codes.shape[1]]


def read(path: str | Path) -> Checkpoint:
    """Read and check a single-file checkpoint; raise MissingScale/BadScale/UnknownFormat."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {strip(k): f.get_tensor(k) for k in f.keys()}
    fmt = detect(list(tensors), {k: t.dtype for k, t in tensors.items()}, metadata)
    formats = layer_formats(tensors, metadata) if fmt == "comfyui" else {}
    ckpt = Checkpoint(fmt)
    aux = {k for k in tensors if k.endswith((".scale_weight", ".weight_scale", ".comfy_quant") + _ACT_SCALES)}
    for key, t in tensors.items():
        if key in aux or key in _MARKERS:
            if key.endswith(_ACT_SCALES):
                ckpt.count("activation scales ignored (dynamic per-row activations)")
            continue
        if t.dtype not in FP8:
            if key.endswith(".weight") and not t.is_floating_point():
                raise UnknownFormat(f"{key}: {t.dtype} weight in a {fmt} checkpoint; only FP8 quantization is supported")
            ckpt.plain[key] = t
            continue
        _take_fp8(ckpt, key, t, tensors, formats)
    return ckpt


def _take_fp8(ckpt: Checkpoint, key: str, codes: torch.Tensor, tensors: dict, formats: dict) -> None:
    fmt = ckpt.format
    layer_fmt = formats.get(key.removesuffix(".weight"))
    if layer_fmt is not None and not str(layer_fmt).startswith("float8"):
        raise UnknownFormat(f"{key}: layer format {layer_fmt!r} in a {fmt} checkpoint; only FP8 is supported")
    skey = scale_key(key, fmt)
    if fmt == "fp8-unscaled" or skey not in tensors:
        raise MissingScale(f"{key}: FP8 weight without its scale ({skey}) in a {fmt} checkpoint; refusing to "
                           "use raw FP8 codes as weights (they would generate noise)")
    if codes.dim() != 2:
        raise UnknownFormat(f"{key}: FP8 tensor of {codes.dim()} dimensions in a {fmt} checkpoint (expected a "
                            "linear weight)")
    rs = row_scale(key, codes, tensors[skey], fmt, ckpt)
    if rs is None or codes.dtype != torch.float8_e4m3fn:
        # Per-block scales or e5m2 codes do not fit the per-row e4m3 recipe: dequantize (exactly, in
        # fp32); the importer re-quantizes the layer per row (or keeps it bf16 if the skip list says so).
        ckpt.count("per-block" if rs is None else "e5m2")
        ckpt.plain[key] = dequantize_blocks(codes, tensors[skey]) if rs is None else codes.to(torch.float32) * rs
        return
    ckpt.codes[key] = codes
    ckpt.row_scales[key] = rs
