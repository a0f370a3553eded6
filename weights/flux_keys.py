"""FLUX key map: original BFL / ComfyUI names <-> diffusers names, for any FLUX geometry.

This is diffusers' `convert_flux_transformer_checkpoint_to_diffusers` written as data, because that
function hard-codes FLUX.1's inner dimension (3072) and so cannot convert another geometry (our
tiny test model). tests/test_weights_keys.py runs the diffusers function on FLUX.1-dev geometry and
checks this table gives the same names and the same rows, so the two cannot drift apart.

Every entry is `(diffusers_key, bfl_key, rows)`: the diffusers tensor is rows `[a, b)` of the BFL
tensor (None: all of it; "swap": its two halves swapped, the AdaLN shift/scale order). All
operations act on dim 0 only, so they apply to FP8 codes (as bytes) and to `[out, 1]` scales alike.
"""

from __future__ import annotations

import torch

from weights.errors import UnknownFormat

Entry = tuple[str, str, object]
CLASS_NAME = "FluxTransformer2DModel"


def infer_config(shape: dict[str, tuple]) -> dict:
    """A FluxTransformer2DModel config from BFL key names and shapes (FLUX.1: head dim 128)."""
    try:
        inner, in_ch = shape["img_in.weight"]
        head = shape["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        config = {"_class_name": CLASS_NAME, "patch_size": 1, "in_channels": in_ch,
                  "num_layers": 1 + max(int(k.split(".")[1]) for k in shape if k.startswith("double_blocks.")),
                  "num_single_layers": 1 + max(int(k.split(".")[1]) for k in shape if k.startswith("single_blocks.")),
                  "attention_head_dim": head, "num_attention_heads": inner // head,
                  "joint_attention_dim": shape["txt_in.weight"][1],
                  "pooled_projection_dim": shape["vector_in.in_layer.weight"][1],
                  "guidance_embeds": "guidance_in.in_layer.weight" in shape}
    except (KeyError, ValueError, IndexError):
        raise UnknownFormat("not a FLUX transformer checkpoint (BFL key names expected: img_in, double_blocks...)") from None
    if head != 128:
        raise UnknownFormat(f"head dim {head} is not FLUX.1's 128: pass --config with the transformer's config.json")
    return {**config, "axes_dims_rope": [16, 56, 56]}


def entries(keys, config: dict) -> list[Entry]:
    """The key map of this file: FLUX's is fixed by the config (`table`)."""
    return table(config)


def geometry(config: dict) -> dict:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return {"inner": inner, "mlp": int(inner * 4.0), "layers": config["num_layers"],
            "single": config["num_single_layers"], "guidance": config.get("guidance_embeds", False)}


def _linear(d: str, b: str, rows=None) -> list[Entry]:
    return [(f"{d}.weight", f"{b}.weight", rows), (f"{d}.bias", f"{b}.bias", rows)]


def _split(d_names: list[str], b: str, sizes: list[int]) -> list[Entry]:
    out, start = [], 0
    for d, n in zip(d_names, sizes):
        out += _linear(d, b, (start, start + n))
        start += n
    return out


def _double(i: int, inner: int) -> list[Entry]:
    d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
    e = _linear(f"{d}.norm1.linear", f"{b}.img_mod.lin") + _linear(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
    e += _split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{b}.img_attn.qkv", [inner] * 3)
    e += _split([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{b}.txt_attn.qkv",
                [inner] * 3)
    e += [(f"{d}.attn.norm_q.weight", f"{b}.img_attn.norm.query_norm.scale", None),
          (f"{d}.attn.norm_k.weight", f"{b}.img_attn.norm.key_norm.scale", None),
          (f"{d}.attn.norm_added_q.weight", f"{b}.txt_attn.norm.query_norm.scale", None),
          (f"{d}.attn.norm_added_k.weight", f"{b}.txt_attn.norm.key_norm.scale", None)]
    for ff, mlp in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
        e += _linear(f"{d}.{ff}.net.0.proj", f"{b}.{mlp}.0") + _linear(f"{d}.{ff}.net.2", f"{b}.{mlp}.2")
    return e + _linear(f"{d}.attn.to_out.0", f"{b}.img_attn.proj") + _linear(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")


def _single(i: int, inner: int, mlp: int) -> list[Entry]:
    d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
    e = _linear(f"{d}.norm.linear", f"{b}.modulation.lin")
    e += _split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{b}.linear1",
                [inner, inner, inner, mlp])
    e += [(f"{d}.attn.norm_q.weight", f"{b}.norm.query_norm.scale", None),
          (f"{d}.attn.norm_k.weight", f"{b}.norm.key_norm.scale", None)]
    return e + _linear(f"{d}.proj_out", f"{b}.linear2")


def table(config: dict) -> list[Entry]:
    """The full map for a FluxTransformer2DModel config."""
    g = geometry(config)
    e = _linear("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    e += _linear("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    e += _linear("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    e += _linear("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if g["guidance"]:
        e += _linear("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        e += _linear("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    e += _linear("context_embedder", "txt_in") + _linear("x_embedder", "img_in")
    for i in range(g["layers"]):
        e += _double(i, g["inner"])
    for i in range(g["single"]):
        e += _single(i, g["inner"], g["mlp"])
    e += _linear("proj_out", "final_layer.linear")
    return e + _linear("norm_out.linear", "final_layer.adaLN_modulation.1", "swap")


def take(t: torch.Tensor, rows) -> torch.Tensor:
    """Apply one entry's row operation to a tensor (FP8 codes must be passed as uint8 views)."""
    if rows is None:
        return t
    if rows == "swap":
        shift, scale = t.chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)
    return t[rows[0]:rows[1]]


def to_diffusers(bfl: dict, config: dict) -> dict:
    """BFL-named tensors (any per-row-aligned kind) -> diffusers-named tensors; unknown keys refused."""
    entries = table(config)
    missing = sorted({b for _, b, _ in entries} - set(bfl))
    if missing:
        raise KeyError(f"BFL keys missing: {missing[:3]}")
    extra = sorted(set(bfl) - {b for _, b, _ in entries})
    if extra:
        raise KeyError(f"BFL keys not in a FLUX transformer of this config: {extra[:3]}")
    return {d: take(bfl[b], rows) for d, b, rows in entries}


def to_bfl(diff: dict, config: dict) -> dict:
    """diffusers-named tensors -> BFL names (test fixtures: the inverse of `to_diffusers`)."""
    pieces: dict[str, list] = {}
    for d, b, rows in table(config):
        t = diff[d]
        pieces.setdefault(b, []).append((0 if rows in (None, "swap") else rows[0], take(t, rows) if rows == "swap" else t))
    return {b: torch.cat([t for _, t in sorted(p, key=lambda x: x[0])], dim=0) for b, p in pieces.items()}
