"""External FP8 checkpoints generated in code from the tiny FLUX transformer (no downloads).

Each writer quantizes the BFL-named weights of the block linears the way its publisher does
(per-tensor scale = amax / 448, or per-channel) and stores them with that format's scale keys.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save_file

from weights import flux_keys

FP8 = torch.float8_e4m3fn
FORMATS = ("comfyui-legacy", "comfyui", "comfyui-header", "ct-tensor", "ct-channel")
DETECTED = {"comfyui-legacy": "comfyui-legacy", "comfyui": "comfyui", "comfyui-header": "comfyui",
            "ct-tensor": "compressed-tensors", "ct-channel": "compressed-tensors"}
COMFY = "model.diffusion_model."


def tiny_transformer():
    """The tiny FLUX transformer of app/tiny.py, in bf16, with weights large enough to matter."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True)
    with torch.no_grad():  # default init leaves modulation at ~0; random weights exercise every layer
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.to(torch.bfloat16).eval()


def quantized_keys(bfl: dict) -> list[str]:
    """Publishers quantize the block linears (modulation included) and keep embedders bf16."""
    return [k for k, v in bfl.items() if k.endswith(".weight") and v.dim() == 2 and "_blocks." in k]


def quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) with dequantized = codes x scale."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = (amax / 448.0).clamp(min=1e-12)
    return (w / scale).clamp(-448, 448).to(FP8), scale


def write(path, fmt: str, model) -> dict:
    """Write `model` to `path` in `fmt`; return {bfl weight key: (codes, scale)} as written."""
    bfl = flux_keys.to_bfl({k: v.detach() for k, v in model.state_dict().items()}, dict(model.config))
    out, meta, written = {}, {}, {}
    layers = {}
    for key in quantized_keys(bfl):
        codes, scale = quantize(bfl[key], per_channel=fmt == "ct-channel")
        layer = key.removesuffix(".weight")
        if fmt == "comfyui-legacy":
            out[f"{layer}.scale_weight"] = scale.reshape(())
            out[f"{layer}.scale_input"] = torch.ones(())
        elif fmt.startswith("comfyui"):
            out[f"{layer}.weight_scale"] = scale.reshape(())
            out[f"{layer}.input_scale"] = torch.ones(())
            layers[layer] = {"format": "float8_e4m3fn"}
        elif fmt == "ct-tensor":
            out[f"{layer}.weight_scale"] = scale.reshape(1)
        else:
            out[f"{layer}.weight_scale"] = scale
        bfl[key] = codes
        written[key] = (codes, scale)
    prefix = COMFY if fmt.startswith("comfyui") else ""
    if fmt == "comfyui-legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    if fmt == "comfyui":
        for layer, info in layers.items():
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    if fmt == "comfyui-header":
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0",
                                                     "layers": {prefix + k: v for k, v in layers.items()}})
    tensors = {prefix + k: v.contiguous() for k, v in {**bfl, **out}.items()}
    save_file(tensors, str(path), metadata=meta or None)
    return written


def rewrite(path, edit) -> None:
    """Load a fixture file, apply `edit(tensors, metadata)` in place, save it back."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta or None)


def rewrite_header(path, edit) -> None:
    """Apply `edit(header dict)` to a safetensors file's JSON header in place, data untouched."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * max(0, n - len(text))  # data offsets are relative to the data section: any length works
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


# ---- other families: tiny diffusers models written the way their published single files are ----

def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.to(torch.bfloat16).eval()


def tiny_qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return _randomize(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))


def tiny_wan():
    """Wan 2.1 I2V shape: image embedder and the image keys/values of cross-attention."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return _randomize(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, image_dim=32, added_kv_proj_dim=32))


# diffusers name -> Wan original name, the inverse of diffusers' convert_wan_transformer_to_diffusers
# (tests/test_weights_keys.py checks the round trip through diffusers' function).
_WAN_BACK = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
             ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
             ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
             ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
             ("condition_embedder.time_proj", "time_projection.1"),
             ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
             ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
             ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
             ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
             ("attn1", "self_attn"), ("attn2", "cross_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."),
             (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
             (".norm_added_k.", ".norm_k_img."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
             (".norm2.", ".norm3.")]


def wan_original(name: str) -> str:
    if name == "scale_shift_table":
        return "head.modulation"
    if name.startswith("proj_out."):
        return "head.head." + name.removeprefix("proj_out.")
    for d, o in _WAN_BACK:
        name = name.replace(d, o)
    return name.replace(".scale_shift_table", ".modulation")


def block_linears(tensors: dict) -> list[str]:
    """What the publishers quantize: 2-D weights inside the blocks (embedders and head stay bf16)."""
    return [k for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2 and k.startswith(
        ("blocks.", "transformer_blocks.", "double_blocks.", "single_blocks."))]


def write_published(path, tensors: dict, style: str, marker: bool = False) -> dict:
    """Write original-named bf16 `tensors` as a published file; return {weight: (codes, scale)}.

    scaled      FP8 codes + per-tensor `<layer>.scale_weight` (Kijai's Wan files; ComfyUI's with `marker`)
    plain-cast  the weights cast to float8_e4m3fn, no scales (Comfy-Org's fp8_e4m3fn files)
    stripped    a scaled file with every scale removed (what must be refused)
    """
    out, written = dict(tensors), {}
    for key in block_linears(tensors):
        if style == "plain-cast":
            codes, scale = tensors[key].to(FP8), torch.ones(())
        else:
            codes, scale = quantize(tensors[key], per_channel=False)
            if style == "scaled":
                out[f"{key.removesuffix('.weight')}.scale_weight"] = scale.reshape(())
        out[key] = codes
        written[key] = (codes, scale)
    if marker and style == "scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file({COMFY + k: v.contiguous() for k, v in out.items()}, str(path))
    return written
