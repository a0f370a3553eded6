"""The capped bench's pipelines: full-size random-weight ones on the GPU (bench.models, bench.edit), or the
families' tiny ones on a CPU (plumbing only)."""

from __future__ import annotations

import base64
import io


def build_qwen_edit_plus(device: str = "cuda"):
    """Qwen-Image-Edit-Plus shape, random weights: the 20.4B transformer (bench.edit.build), Qwen2.5-VL 7B
    (its published text and vision sizes) and Qwen-Image's VAE; the family's word-level tokenizer, and
    Qwen2-VL's processor at its own pixel limits (the pipeline hands it a 384x384 condition image)."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

    from app.families.qwen_image_edit import _absent_video_processor_allowed, _tiny_tokenizer
    from bench.edit import build as build_transformer
    from bench.models import reinit

    tokenizer = _tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    transformer = build_transformer(device)
    torch.manual_seed(1)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                         rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    with torch.device(device):
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
        vae = AutoencoderKLQwenImage().to(torch.bfloat16)
    reinit(text_encoder)
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    with _absent_video_processor_allowed():
        processor = Qwen2VLProcessor(image_processor=cls(patch_size=14, merge_size=2, temporal_patch_size=2),
                                     tokenizer=tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    pipe = diffusers.QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(),
                                               tokenizer=tokenizer, processor=processor, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model(name: str, tiny: bool):
    """(ModelSource, build) of a family: its tiny pipeline, or the full-size random-weight one on the GPU."""
    from app.families import FAMILIES
    from app.source import ModelSource

    family = FAMILIES[name]
    if tiny:
        return ModelSource("tiny", f"tiny-{name}", family.tiny_variant()), family.build_tiny
    if name == "flux":
        from bench.models import build_flux_dev

        return ModelSource("hub", "flux-dev-shape-random", family), lambda: build_flux_dev("cuda")
    return ModelSource("hub", f"{name}-shape-random", family), lambda: build_qwen_edit_plus("cuda")


def flux_denoiser(cuda: bool, size: int):
    """(family, fused-QKV FLUX transformer, one forward's inputs at `size`): FLUX.1-dev's full-size one built
    on the GPU, or the tiny one; nothing else of the pipeline is kept."""
    import types

    from app.families import FAMILIES
    from weights.quantize import fuse_qkv

    family = FAMILIES["flux"]
    if cuda:
        from bench.models import build_flux_transformer

        t = build_flux_transformer("cuda")
        holder = types.SimpleNamespace(transformer=t, vae_scale_factor=8)
    else:
        family = family.tiny_variant()
        holder = family.build_tiny()
        t = holder.transformer
    fuse_qkv(t)
    return family, t, family.denoiser_inputs(holder, size, size)


def image_ref(size: int) -> str:
    """A data: URI of the family's synthetic test card at `size` (JPEG: a small request body)."""
    from app.families.base import synthetic_image

    buf = io.BytesIO()
    synthetic_image(size, size).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
