"""Full-size pipelines with random weights of the real architectures, built directly on the GPU.

Speed does not depend on the weight values, so these stand in for FLUX.1-dev and SDXL in every
benchmark (reported as "random weights"). Adapted from shared/probes/flux_random.py.
"""

from __future__ import annotations

import torch

from app.tiny import tokenizer


def reinit(module, std: float = 0.02) -> None:
    """Normal(0, std) matrices, unit norms, zero biases: activations stay in a realistic range."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
            elif "weight" in name or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_flux_transformer(device: str = "cuda", dtype=torch.bfloat16, guidance_embeds: bool = True):
    """FLUX.1-dev's 11.9B transformer alone, random (seed 0); `build_flux_dev` builds its transformer
    with this, so both hold the same weights. Needs diffusers only, not transformers."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(guidance_embeds=guidance_embeds).to(dtype)
    reinit(transformer)
    return transformer.eval()


def build_flux_dev(device: str = "cuda", dtype=torch.bfloat16, guidance_embeds: bool = True):
    """FLUX.1-dev shape: 11.9B transformer, T5-XXL (4.76B), CLIP-L, 16-channel VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = build_flux_transformer(device, dtype, guidance_embeds)  # seeds 0: the same weights
    with torch.device(device):
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                                            max_position_embeddings=77, hidden_act="quick_gelu",
                                            bos_token_id=0, eos_token_id=2, pad_token_id=0)).to(dtype)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", is_gated_act=True,
                                     dense_act_fn="gelu_new")).to(dtype)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=1024,
                            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False).to(dtype)
    for m in (clip, t5):
        reinit(m)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, text_encoder=clip, tokenizer=tokenizer(77), text_encoder_2=t5,
                        tokenizer_2=tokenizer(512), transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_qwen_image_transformer(device: str = "cuda", **config):
    """Qwen-Image(-Edit)'s 20.4B transformer, random (seed 0), bf16: diffusers' defaults are its published
    config (60 blocks, 24 heads of 128, text 3584) unless `config` narrows it."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        t = QwenImageTransformer2DModel(**config).to(torch.bfloat16)
    reinit(t)
    return t.eval()


# SDXL base's UNet (2.6 B parameters), as in its published config.json.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def build_sdxl(device: str = "cuda", dtype=torch.bfloat16):
    """SDXL base shape: 2.6B UNet, CLIP-L + OpenCLIP-bigG encoders, 4-channel VAE."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        te1 = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                           hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)).to(dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         projection_dim=1280, max_position_embeddings=77,
                                                         hidden_act="gelu", bos_token_id=0, eos_token_id=2)).to(dtype)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=1024,
                            scaling_factor=0.13025).to(dtype)
    for m in (unet, te1, te2):
        reinit(m)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                   beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer(77),
                                     tokenizer_2=tokenizer(77), unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The full-size random-weight build of each family the latency bench measures.
FULL_SIZE = {"flux": build_flux_dev, "sdxl": build_sdxl}
