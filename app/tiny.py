"""Tiny random pipelines built in code (tokenizers included): the CPU demo and the test fixtures.

They have the real diffusers classes and the real data flow (text encoders, denoiser, VAE with a
scale factor of 8), only narrow and shallow, so a 256x256 image takes well under a second on a CPU.
The weights are random (seeded), so the pictures are noise by design.
"""

from __future__ import annotations

import torch

WORDS = (
    "a an the of on in with and at by for from to photo picture portrait painting drawing render "
    "cat dog bird horse sneaker shoe car house tree flower mountain beach sea sky city street room "
    "red green blue yellow white black orange purple pink gold silver bright dark soft warm cold "
    "studio lighting background product sign says hello world close up wide shot night day sunset "
    "small large old new happy sad cinematic detailed sharp blurry minimal style art"
).split()


def tokenizer(max_length: int):
    """A word-level fast tokenizer over a small fixed vocabulary (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>", model_max_length=max_length
    )


def _clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=0, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, hidden_act="gelu", projection_dim=32,
        max_position_embeddings=77,
    )


def _vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16, 16, 16),
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=256, **extra,
    )


def _eval(pipe):
    """Inference mode for every component: modules built in code start in training mode, where T5's
    dropout (p=0.1) made the same seed give different images. from_pretrained does this itself."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def build_tiny_flux(guidance_embeds: bool = True):
    """FluxPipeline with a 2-block transformer, tiny CLIP and T5, and an 8x VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0))
    vae = _vae(4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return _eval(FluxPipeline(
        scheduler=scheduler, text_encoder=CLIPTextModel(_clip_config()), tokenizer=tokenizer(77),
        text_encoder_2=t5, tokenizer_2=tokenizer(512), transformer=transformer, vae=vae,
    ))


def build_tiny_sdxl():
    """StableDiffusionXLPipeline with a two-level UNet, two tiny CLIP encoders and an 8x VAE."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    return _eval(StableDiffusionXLPipeline(
        vae=_vae(4, scaling_factor=0.13025), text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer=tokenizer(77),
        tokenizer_2=tokenizer(77), unet=unet, scheduler=scheduler,
    ))
