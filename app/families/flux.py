"""FLUX.1 (dev and schnell) text-to-image: `FluxPipeline` over `FluxTransformer2DModel`.

A job that sends an image runs image-to-image (`FluxImg2ImgPipeline` on the same loaded modules).
Guidance-distilled: no negative prompt (that would need true CFG, two passes a step). The variant
comes from the transformer's config: FLUX.1-dev has guidance embeddings (28 steps, guidance 3.5),
FLUX.1-schnell has none (4 steps, guidance 0, 256 T5 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from app.families.base import Defaults, Family, StepCallback
from app.schema import Job

PROMPT_TOKENS = 512  # T5 tokens FLUX.1-dev was trained with


@dataclass(frozen=True)
class Flux(Family):
    def variant(self, denoiser_config) -> Family:
        if not getattr(denoiser_config, "guidance_embeds", True):  # FLUX.1-schnell
            return replace(self, defaults=replace(self.defaults, steps=4, guidance=0.0, max_sequence_length=256),
                           mag_ratios=None)  # diffusers' FLUX ratios are FLUX.1-dev's
        return self

    def call_kwargs(self, job: Job, on_step: StepCallback | None = None, images: list | None = None) -> dict:
        kw = super().call_kwargs(job, on_step, images)
        kw["max_sequence_length"] = self.defaults.max_sequence_length
        return kw

    def img2img_steps(self, job: Job) -> int:
        # FluxImg2ImgPipeline.get_timesteps skips int(steps * (1 - strength)): one more than SDXL's count
        steps = job.num_inference_steps
        return steps - int(max(steps - steps * job.strength, 0))

    def build_tiny(self, guidance_embeds: bool = True):
        """The family's pipeline class (FluxPipeline) with a 3-block transformer, tiny CLIP and T5, and an
        8x VAE."""
        import diffusers
        import torch

        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5Config, T5EncoderModel

        from app.tiny import clip_config, eval_mode, tokenizer, vae

        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=guidance_embeds,
        )
        t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                     feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0))
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
        return eval_mode(getattr(diffusers, self.pipeline_class)(
            scheduler=scheduler, text_encoder=CLIPTextModel(clip_config()), tokenizer=tokenizer(77),
            text_encoder_2=t5, tokenizer_2=tokenizer(PROMPT_TOKENS), transformer=transformer,
            vae=vae(4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        ))

    def encode(self, pipe, prompt: str, max_sequence_length: int | None = None) -> dict:
        pe, ppe, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None,
                                        max_sequence_length=max_sequence_length or self.defaults.max_sequence_length)
        return dict(prompt_embeds=pe, pooled_prompt_embeds=ppe)

    def text_extra(self, pipe, job: Job) -> tuple:
        # CLIP and T5 see the prompt only (Kontext's and img2img's too): no CFG, nothing else to key on
        return ()

    def encode_text(self, pipe, job: Job, length: int | None) -> dict:
        return self.encode(pipe, job.prompt, length)

    def prompt_tokens(self, pipe, prompt: str) -> int:
        """T5's tokens for `prompt`, its end token included, counted up to the default length."""
        cap = self.defaults.max_sequence_length
        return len(pipe.tokenizer_2(prompt, truncation=True, max_length=cap).input_ids)

    def decode(self, pipe, latents, width: int, height: int):
        lat = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.vae.decode(lat, return_dict=False)[0]

    def denoiser_inputs(self, pipe, width: int, height: int, seed: int = 0) -> dict:
        """At 1024x1024 on FLUX.1-dev: 4096 image tokens of 64 channels, 512 T5 tokens of 4096, pooled 768."""
        import torch

        den = getattr(pipe, self.denoiser)
        cfg, dev, dt = den.config, den.device, den.dtype
        g = torch.Generator(dev.type).manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dt)  # noqa: E731
        tokens = (height // pipe.vae_scale_factor // 2) * (width // pipe.vae_scale_factor // 2)  # 2x2 patches
        txt = self.defaults.max_sequence_length
        out = dict(hidden_states=rnd(1, tokens, cfg.in_channels),
                   encoder_hidden_states=rnd(1, txt, cfg.joint_attention_dim),
                   pooled_projections=rnd(1, cfg.pooled_projection_dim),
                   timestep=torch.tensor([0.5], device=dev, dtype=dt),
                   img_ids=torch.zeros(tokens, 3, device=dev, dtype=dt),
                   txt_ids=torch.zeros(txt, 3, device=dev, dtype=dt), return_dict=False)
        if cfg.guidance_embeds:
            out["guidance"] = torch.tensor([self.defaults.guidance], device=dev, dtype=dt)
        return out


FAMILY = Flux(
    name="flux",
    pipeline_class="FluxPipeline",
    denoiser="transformer",
    defaults=Defaults(1024, 1024, 28, 3.5, PROMPT_TOKENS),
    max_pixels=2048 * 2048,
    shapes=((1024, 1024), (1344, 768), (768, 1344)),
    quant_skip=(r"x_embedder", r"context_embedder", r"time_text_embed\..*", r"norm_out\..*", r"proj_out",
                r".*norm1(_context)?\.linear", r"single_transformer_blocks\.\d+\.norm\.linear"),
    negative_prompt=False,  # guidance-distilled: a negative prompt needs true CFG (2x cost)
    cuda_graphs=False,  # H200: 95.9 vs 96.2 ms/step (0.3%), not worth the graphs' memory (variants_graphs_h200.json)
    vram_gib={"bf16": 36.0, "fp8": 22.0, "int8": 22.0},
    # Weights: the FLUX.1-dev architecture on the meta device (fp8: FP8Linear where the skip list allows,
    # 15.2 GB as baked; int8: the same layers at a byte a weight); T5-XXL 8.87 + CLIP-L 0.23 GiB in bf16,
    # 5.50 + 0.23 with their repeated layers in FP8 (T5's `wo` kept); VAE 0.16. decode: peak minus resident
    # at 1024x1024 is 2.38 GiB for FLUX and SDXL alike (latency_h200.json), whose VAE decoders are the
    # same there: the decode's peak. activations: a step's working memory, an estimate under that.
    memory={p: {"denoiser": den, "text_encoders": 9.10, "text_encoders_fp8": 5.73, "vae": 0.16,
                "activations": 1.0, "decode": 2.4, "block": blk}
            for p, den, blk in (("bf16", 22.17, 1.38), ("fp8", 14.16, 0.96), ("int8", 14.16, 0.96))},
    tiny_defaults=Defaults(256, 256, 4, 3.5, 64),
    checkpoint_keys="weights.flux_keys",
    img2img_class="FluxImg2ImgPipeline",  # a job sending an image runs image-to-image on the same weights
    default_strength=0.8,
    text_buckets=True,  # TEXT_BUCKETS=1: T5 at 128/256/384 tokens when the prompt fits (trained at 512)
    mag_ratios="FLUX_MAG_RATIOS",  # diffusers' calibration on FLUX.1-dev
)
