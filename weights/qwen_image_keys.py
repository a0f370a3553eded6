"""Qwen-Image / Qwen-Image-Edit key map: ComfyUI's single files use diffusers' own names.

ComfyUI's Qwen-Image transformer (comfy/ldm/qwen_image/model.py) was written against diffusers'
`QwenImageTransformer2DModel` state dict (`transformer_blocks.N.attn.to_q`, `img_mod.1`, `img_mlp.net.0.proj`,
`norm_out.linear` in diffusers' (scale, shift) order...), and its files (plain `float8_e4m3fn` casts and
scaled ones) only add the `model.diffusion_model.` prefix, which the reader strips: the map is the
identity, and the importer's geometry check refuses any name or shape the model does not have.
"""

from __future__ import annotations

from weights.errors import UnknownFormat

CLASS_NAME = "QwenImageTransformer2DModel"


def entries(keys, config: dict) -> list[tuple[str, str, None]]:
    return [(k, k, None) for k in keys]


def infer_config(shape: dict[str, tuple]) -> dict:
    """A QwenImageTransformer2DModel config from shapes (patch 2, RoPE axes (16, 56, 56) of head dim 128).

    What shapes cannot show (`zero_cond_t` of Qwen-Image-Edit-2511) needs --config.
    """
    try:
        inner, in_ch = shape["img_in.weight"]
        head = shape["transformer_blocks.0.attn.norm_q.weight"][0]
        layers = 1 + max(int(k.split(".")[1]) for k in shape if k.startswith("transformer_blocks."))
        config = {"_class_name": CLASS_NAME, "patch_size": 2, "in_channels": in_ch,
                  "out_channels": shape["proj_out.weight"][0] // 4, "num_layers": layers,
                  "attention_head_dim": head, "num_attention_heads": inner // head,
                  "joint_attention_dim": shape["txt_in.weight"][1],
                  "use_additional_t_cond": "time_text_embed.addition_t_embedding.weight" in shape}
    except (KeyError, ValueError, IndexError):
        raise UnknownFormat("not a Qwen-Image transformer checkpoint (expected img_in, txt_in, "
                            "transformer_blocks.N.attn...)") from None
    if head != 128:
        raise UnknownFormat(f"head dim {head} is not Qwen-Image's 128: pass --config with the transformer's config.json")
    return {**config, "axes_dims_rope": [16, 56, 56]}
