"""Wan 2.1 / 2.2 key map: the original names (Kijai's WanVideo_comfy_fp8_scaled, Comfy-Org's plain
casts: `blocks.N.self_attn.q`, `cross_attn.k_img`, `ffn.0`, `norm3`, `modulation`, `head.head`,
`img_emb.proj.N`...) -> diffusers' `WanTransformer3DModel` names.

The renaming is diffusers' own `convert_wan_transformer_to_diffusers` (single_file_utils), called on the
file's key names, not copied: it only renames keys for these models (its tensor reshapes are for the
Animate motion encoder), so it is applied to names and the tensors are read afterwards, a piece at a time.
tests/test_weights_keys.py checks it still maps every name of a tiny Wan I2V model.
"""

from __future__ import annotations

from weights.errors import UnknownFormat

CLASS_NAME = "WanTransformer3DModel"
HEAD_DIM = 128  # Wan 2.1/2.2 (1.3B: 12 heads, 14B: 40); the norms span all heads, so shapes cannot show it


def renamed(keys) -> dict[str, str]:
    """{diffusers name: original name} for the given original names."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    keys = list(keys)
    out = convert_wan_transformer_to_diffusers({k: k for k in keys})
    if len(out) != len(keys):
        raise UnknownFormat(f"Wan key names collide once renamed ({len(keys)} names -> {len(out)})")
    return out


def entries(keys, config: dict) -> list[tuple[str, str, None]]:
    return [(d, b, None) for d, b in renamed(keys).items()]


def infer_config(shape: dict[str, tuple]) -> dict:
    """A WanTransformer3DModel config from the shapes of original-named tensors (head dim 128)."""
    s = {d: shape[b] for d, b in renamed(shape).items()}
    try:
        inner, in_ch, *patch = s["patch_embedding.weight"]
        cells = patch[0] * patch[1] * patch[2]
        config = {"_class_name": CLASS_NAME, "patch_size": patch, "in_channels": in_ch,
                  "out_channels": s["proj_out.weight"][0] // cells,
                  "num_layers": 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks.")),
                  "attention_head_dim": HEAD_DIM, "num_attention_heads": inner // HEAD_DIM,
                  "text_dim": s["condition_embedder.text_embedder.linear_1.weight"][1],
                  "freq_dim": s["condition_embedder.time_embedder.linear_1.weight"][1],
                  "ffn_dim": s["blocks.0.ffn.net.0.proj.weight"][0],
                  "cross_attn_norm": "blocks.0.norm2.weight" in s,
                  "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in s else None}
    except (KeyError, ValueError, IndexError):
        raise UnknownFormat("not a Wan transformer checkpoint (expected patch_embedding, blocks.N.self_attn...)") from None
    if inner % HEAD_DIM:
        raise UnknownFormat(f"width {inner} is not a multiple of Wan's head dim {HEAD_DIM}: pass --config")
    if "condition_embedder.image_embedder.norm1.weight" in s:  # I2V / FLF2V: the CLIP image embedder
        config["image_dim"] = s["condition_embedder.image_embedder.norm1.weight"][0]
        config["added_kv_proj_dim"] = s["blocks.0.attn2.add_k_proj.weight"][1]
    if "condition_embedder.image_embedder.pos_embed" in s:
        config["pos_embed_seq_len"] = s["condition_embedder.image_embedder.pos_embed"][1]
    return config
