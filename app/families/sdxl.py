"""Stable Diffusion XL text-to-image: `StableDiffusionXLPipeline` over `UNet2DConditionModel`.

A job that sends an image runs image-to-image (`StableDiffusionXLImg2ImgPipeline` on the same loaded
modules). Classifier-free guidance: both halves in one batched UNet forward, so a negative prompt costs nothing
extra. Launch-bound (70 compiled transformer blocks per UNet call with eager ResNets between them),
so CUDA graphs are on by default: 46.7 -> 38.9 ms/step on an H200 at 1024x1024
(bench/results/latency_sdxl_nographs_h200.json, latency_sdxl_graphs_h200.json).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.families.base import Defaults, Family, StepCallback
from app.schema import Job


@dataclass(frozen=True)
class SDXL(Family):
    def call_kwargs(self, job: Job, on_step: StepCallback | None = None, images: list | None = None) -> dict:
        kw = super().call_kwargs(job, on_step, images)
        if "image" in kw:  # StableDiffusionXLImg2ImgPipeline takes its size from the image (fitted already)
            del kw["height"], kw["width"]
        return kw

    def text_extra(self, pipe, job: Job) -> tuple:
        """CFG on or off (off: no negative embeddings), and whether an empty negative is zeros."""
        return (self._cfg(pipe, job), bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)))

    def encode_text(self, pipe, job: Job, length: int | None) -> dict:
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=job.prompt, do_classifier_free_guidance=self._cfg(pipe, job),
                                                negative_prompt=job.negative_prompt)
        out = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                   negative_pooled_prompt_embeds=nppe)
        return {k: v for k, v in out.items() if v is not None}

    @staticmethod
    def _cfg(pipe, job: Job) -> bool:
        # the pipelines' own do_classifier_free_guidance
        return job.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

    def build_tiny(self):
        """StableDiffusionXLPipeline with a two-level UNet, two tiny CLIP encoders and an 8x VAE."""
        import torch

        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from app.tiny import clip_config, eval_mode, tokenizer, vae

        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=8,
        )
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                           beta_schedule="scaled_linear", timestep_spacing="leading")
        return eval_mode(StableDiffusionXLPipeline(
            vae=vae(4, scaling_factor=0.13025), text_encoder=CLIPTextModel(clip_config()),
            text_encoder_2=CLIPTextModelWithProjection(clip_config()), tokenizer=tokenizer(77),
            tokenizer_2=tokenizer(77), unet=unet, scheduler=scheduler,
        ))

    def encode(self, pipe, prompt: str) -> dict:
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=True)
        return dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                    negative_pooled_prompt_embeds=nppe)

    def decode(self, pipe, latents, width: int, height: int):
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]

    def denoiser_inputs(self, pipe, width: int, height: int, seed: int = 0) -> dict:
        """At 1024x1024: a CFG batch of 2, 4x128x128 latents, 77 tokens of 2048, text_embeds 1280."""
        import torch

        den = getattr(pipe, self.denoiser)
        cfg, dev, dt = den.config, den.device, den.dtype
        g = torch.Generator(dev.type).manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dt)  # noqa: E731
        f = pipe.vae_scale_factor
        # the added condition: pooled text embeds + 6 size/crop ids, each embedded in addition_time_embed_dim
        text_embeds = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, device=dev, dtype=dt)
        return dict(sample=rnd(2, cfg.in_channels, height // f, width // f), timestep=torch.tensor(500, device=dev),
                    encoder_hidden_states=rnd(2, 77, cfg.cross_attention_dim),
                    added_cond_kwargs=dict(text_embeds=rnd(2, text_embeds), time_ids=ids), return_dict=False)


FAMILY = SDXL(
    name="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    denoiser="unet",
    defaults=Defaults(1024, 1024, 30, 5.0),
    max_pixels=1536 * 1536,
    shapes=((1024, 1024), (1152, 896), (896, 1152)),
    quant_skip=(r"conv_in", r"conv_out", r"time_embedding\..*", r"add_embedding\..*", r".*norm.*",
                r".*time_emb_proj", r".*conv_shortcut", r".*proj_in", r".*proj_out"),
    negative_prompt=True,
    cuda_graphs=True,
    vram_gib={"bf16": 12.0, "fp8": 10.0, "int8": 10.0},
    # Weights from the SDXL base architecture on the meta device (UNet bf16 4.78 / fp8 2.75 GiB, CLIP-L +
    # OpenCLIP-bigG 1.52, VAE 0.16); decode as FLUX's (the same VAE decoder at 1024x1024); block: the
    # largest up block twice plus the mid block (outside the block lists).
    memory={p: {"denoiser": den, "text_encoders": 1.52, "vae": 0.16, "activations": 1.0, "decode": 2.4,
                "block": blk}
            for p, den, blk in (("bf16", 4.78, 5.27), ("fp8", 2.75, 3.02), ("int8", 2.75, 3.02))},
    tiny_defaults=Defaults(256, 256, 4, 5.0),
    img2img_class="StableDiffusionXLImg2ImgPipeline",  # a job sending an image: same UNet, VAE and encoders
    default_strength=0.8,
)
