"""Wan image-to-video 14B: `WanImageToVideoPipeline` over `WanTransformer3DModel`; one input image, an MP4.

Wan 2.1 I2V 14B (480P and 720P checkpoints) conditions each block on CLIP ViT-H image tokens (its
transformer has `image_dim`); Wan 2.2 I2V A14B has none, and two experts instead: `transformer`
for the high-noise steps, `transformer_2` for the low-noise ones, switched at the pipeline's
`boundary_ratio` (diffusers 0.42.1 runs both; the recipe quantizes and compiles both). The 480P and
720P Wan 2.1 checkpoints have identical configs, so the size follows the input image's aspect within
the default 480P area (832x480), and a job asks for 720P by giving width and height. CFG runs its
two passes one after the other (diffusers' loop; batching measured no faster, issue 17).

The prompt is encoded here, not by the pipeline: diffusers' Wan pipelines clean prompts with `ftfy`,
an optional dependency this worker does not ship; the same UMT5 call on the prompt, HTML-unescaped
and whitespace-collapsed (ftfy's mojibake repair is a no-op on well-formed text), gives the same
embeddings, padded with zeros to 512 tokens as the pipeline does.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, replace

from app.families.base import Defaults, Family, StepCallback, Warmup, step_callback, synthetic_image
from app.schema import Job, parse_job

PROMPT_TOKENS = 512  # Wan's attention processor splits image tokens off at exactly 512 text tokens
AREA_480P = 832 * 480
AREA_720P = 1280 * 720
# Wan's negative prompt from its own repository (sample_neg_prompt, shortened to its English gist): used when a
# job sends none, as the reference code does; a job's negative_prompt replaces it.
DEFAULT_NEGATIVE = ("bright colors, overexposed, static, blurred details, subtitles, style, artwork, painting, "
                    "picture, still, overall gray, worst quality, low quality, JPEG compression artifacts, ugly, "
                    "incomplete, extra fingers, poorly drawn hands, poorly drawn face, deformed, disfigured, "
                    "malformed limbs, fused fingers, still picture, cluttered background, three legs, many people "
                    "in the background, walking backwards")


@dataclass(frozen=True)
class WanI2V(Family):
    def variant(self, denoiser_config) -> Family:
        """Wan 2.2 A14B (no CLIP image tokens: `image_dim` None) samples at guidance 3.5; Wan 2.1 at 5.0.
        Wan 2.1 FLF2V 720P (first/last frame: `pos_embed_seq_len` set) is a 720P-only checkpoint."""
        if getattr(denoiser_config, "image_dim", 1280) is None:
            return self.a14b()
        if getattr(denoiser_config, "pos_embed_seq_len", None):
            return replace(self, defaults=replace(self.defaults, width=1280, height=720))
        return self

    def a14b(self) -> Family:
        """Wan 2.2 A14B: two 14.3B experts (no CLIP tower), 57 GB of bf16 transformers, 29 GB as FP8; the
        memory plan counts both (every plan keeps both where it keeps one: offload-text both resident,
        offload-blocks both streamed, one block of the running expert on the GPU at a time)."""
        return replace(self, defaults=replace(self.defaults, guidance=3.5),
                       vram_gib={"bf16": 78.0, "fp8": 51.0, "int8": 51.0}, memory=memory_tables(experts=2))

    def for_components(self, components: set[str]) -> Family:
        """A model_index.json or manifest holding `transformer_2` is Wan 2.2 A14B's, planned as such."""
        return self.a14b() if "transformer_2" in components else self

    def task(self, with_inputs: bool) -> str:
        return "i2v"

    def tiny_variant(self, model: str = "") -> Family:
        """64x64, 9 frames, 2 steps: the real pipeline in well under a second on a CPU."""
        tiny = super().tiny_variant(model)
        return replace(tiny, min_side=32, max_side=128, max_pixels=128 * 128, max_frames=17)

    def output_size(self, job: Job, images: list) -> tuple[int, int]:
        """The job's size, or the input image's aspect within the default area (480P: 832x480), each side
        a multiple of 16 rounded down, as Wan's reference code sizes its input."""
        if not job.size_from_input:
            return job.width, job.height
        w, h = images[0].size
        area = self.defaults.width * self.defaults.height
        m = self.multiple
        width = max(self.min_side, int(math.sqrt(area * w / h)) // m * m)
        height = max(self.min_side, int(math.sqrt(area * h / w)) // m * m)
        return self.fit_size(width, height)

    def build_tiny(self):
        """WanImageToVideoPipeline with a 2-block transformer (CLIP image tokens: Wan 2.1 I2V), a 1-level
        causal 3D VAE, a 2-layer UMT5 and a 2-layer CLIP vision tower at 32x32 (MODEL=tiny-wan-i2v);
        MODEL=tiny-wan-i2v-a14b builds `build_tiny_a14b`."""
        return self.build_tiny_a14b() if self.tiny_model == "a14b" else _tiny_pipeline(experts=1)

    def build_tiny_a14b(self):
        """Wan 2.2 I2V A14B's shape, tiny: two 2-block experts without image tokens (`transformer` for
        the high-noise steps, `transformer_2` below boundary_ratio 0.9, as the published model_index),
        no CLIP tower; the same VAE and UMT5 as `build_tiny`."""
        return _tiny_pipeline(experts=2)

    # -- jobs ----------------------------------------------------------------------------------------
    def call_kwargs(self, job: Job, on_step: StepCallback | None = None, images: list | None = None) -> dict:
        """One video: the input image fitted to the job's size (Wan's first frame), frames as numpy. The
        prompts are text here; `generate` swaps them for their embeddings (`encode`)."""
        import torch

        kw = dict(
            image=self.fit_input(images[0], job.width, job.height),
            prompt=job.prompt,
            negative_prompt=job.negative_prompt or DEFAULT_NEGATIVE,
            height=job.height,
            width=job.width,
            num_frames=job.num_frames,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            max_sequence_length=PROMPT_TOKENS,
            output_type="np",
        )
        if on_step is not None:
            kw["callback_on_step_end"] = step_callback(on_step, job.num_inference_steps)
        return kw

    def generate(self, pipe, job: Job, on_step: StepCallback | None = None, images: list | None = None,
                 text=None, timings: dict | None = None) -> list:
        """Run `job`; return one video: uint8 frames [frames, height, width, 3]."""
        import numpy as np
        import torch

        kw = self.call_kwargs(job, on_step, images)
        with torch.inference_mode():
            kw = self.with_text(pipe, job, kw, text, timings)
            with self.step_cache(pipe, job, job.num_inference_steps):
                frames = pipe(**kw).frames[0]
        # the pipeline's own float [0, 1] frames, rounded as its "pil" output does
        return [(np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)]

    def text_extra(self, pipe, job: Job) -> tuple:
        # UMT5 sees the prompts only (the image goes to CLIP); the default negative is in the key's negative
        return ()

    def encode_text(self, pipe, job: Job, length: int | None) -> dict:
        return self.encode(pipe, job.prompt, job.negative_prompt or DEFAULT_NEGATIVE)

    def encode(self, pipe, prompt: str, negative_prompt: str | None = DEFAULT_NEGATIVE) -> dict:
        """prompt_embeds and negative_prompt_embeds [1, 512, 4096] as the pipeline computes them."""
        out = dict(prompt_embeds=_t5_embeds(pipe, prompt))
        if negative_prompt is not None:
            out["negative_prompt_embeds"] = _t5_embeds(pipe, negative_prompt)
        return out

    def decode(self, pipe, latents, width: int, height: int):
        """The VAE decode of `output_type="latent"` latents [1, 16, latent frames, h/8, w/8] -> [1, 3, frames, h, w]."""
        import torch

        vae = pipe.vae
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        return vae.decode(latents * std + mean, return_dict=False)[0]

    def denoiser_inputs(self, pipe, width: int, height: int, seed: int = 0, frames: int | None = None) -> dict:
        """One transformer forward as the pipeline calls it: at 832x480 and 81 frames, 21 latent frames of
        36 channels (noise + first-frame condition + mask) at 60x104 (32,760 tokens after 2x2 patches),
        512 UMT5 tokens of 4096, 257 CLIP tokens of 1280 (Wan 2.1; Wan 2.2 has none)."""
        import torch

        den = pipe.transformer
        cfg, dev, dt = den.config, den.device, den.dtype
        g = torch.Generator(dev.type).manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dt)  # noqa: E731
        lat_frames = ((frames or self.defaults.frames) - 1) // self.frame_multiple + 1
        out = dict(hidden_states=rnd(1, cfg.in_channels, lat_frames, height // 8, width // 8),
                   timestep=torch.tensor([500.0], device=dev), encoder_hidden_states=rnd(1, PROMPT_TOKENS, cfg.text_dim),
                   return_dict=False)
        if cfg.image_dim:
            enc = getattr(pipe, "image_encoder", None)
            tokens = (enc.config.image_size // enc.config.patch_size) ** 2 + 1 if enc is not None else 257
            out["encoder_hidden_states_image"] = rnd(1, tokens, cfg.image_dim)
        return out

    def encode_outputs(self, outputs: list, job: Job) -> list:
        from app.video import encode_video

        return [encode_video(frames, job) for frames in outputs]

    def warmup_jobs(self, shapes) -> list[Warmup]:
        """One short job per bucket at the default frame count (the token count is frames x size)."""
        out = []
        for w, h in shapes:
            job = parse_job({"prompt": "warm up", "image": "data:image/png;base64,", "width": w, "height": h,
                             "num_inference_steps": 2, "seed": 0}, self)
            out.append(Warmup(job, [synthetic_image(w, h)]))
        return out


# GiB per component (preflight.memory.COMPONENTS), Wan 2.1 I2V 14B from bench/results/video_h200.json (H200,
# FP8: the transformer resident 15.6, a 480p/81-frame step +2.2 over it, a 4-step job's peak 32.0 = 15.6 +
# 11.8 + 0.24 + 4.4 for the decode); bf16 and Wan 2.2 from parameter counts (2 bytes each; an A14B expert
# is 14.3B parameters: 26.6 bf16, 13.6 FP8 with its bf16 embedders). Text encoders: UMT5-XXL 10.6 (FP8:
# 6.3, its 256k-token embedding stays bf16) + CLIP ViT-H 1.2 (Wan 2.1 only). `block`: two 14B blocks and
# the modules outside them, one expert at a time (diffusers offloads an expert's outer group after its
# forward).
_PER_EXPERT = {"bf16": (30.5, 1.7), "fp8": (15.6, 0.95), "int8": (15.6, 0.95)}  # Wan 2.1: (denoiser, block)
_PER_A14B_EXPERT = {"bf16": 26.6, "fp8": 13.6, "int8": 13.6}


def memory_tables(experts: int = 1) -> dict[str, dict[str, float]]:
    """precision -> component GiB: Wan 2.1 (one transformer) or Wan 2.2 A14B (`experts=2`, both counted)."""
    out = {}
    for precision, (den, block) in _PER_EXPERT.items():
        a14b = experts == 2
        out[precision] = {"denoiser": round(experts * _PER_A14B_EXPERT[precision], 2) if a14b else den,
                          "text_encoders": 10.6 if a14b else 11.8, "text_encoders_fp8": 6.3 if a14b else 7.5,
                          "vae": 0.24, "activations": 2.2, "decode": 4.4, "block": block}
    return out


def _tiny_pipeline(experts: int):
    """The tiny random pipeline: Wan 2.1 I2V (one transformer with CLIP image K/V) or Wan 2.2 A14B (two)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, \
        UMT5EncoderModel

    from app.tiny import eval_mode, tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8,
                                               feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                               pad_token_id=0))
    image = dict(image_dim=16, added_kv_proj_dim=32) if experts == 1 else dict(image_dim=None)

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,  # widths of 16k: FP8-able
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **image)

    parts = dict(tokenizer=tokenizer(PROMPT_TOKENS), text_encoder=text_encoder, vae=vae,
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    if experts == 1:  # built before the transformer, as the random draws have always been ordered
        parts.update(image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            intermediate_size=16, patch_size=8)), image_processor=CLIPImageProcessor(crop_size=32, size=32),
            transformer=transformer())
    else:
        parts.update(transformer=transformer(), transformer_2=transformer(), boundary_ratio=0.9)
    return eval_mode(getattr(diffusers, FAMILY.pipeline_class)(**parts))


def clean_prompt(text: str) -> str:
    """Wan's prompt_clean without ftfy: HTML entities decoded (twice, as Wan does), whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def _t5_embeds(pipe, prompt: str):
    """UMT5's last hidden state of the prompt's tokens, zeroed past its length (WanPipeline's
    `_get_t5_prompt_embeds` for one prompt)."""
    import torch

    tok = pipe.tokenizer([clean_prompt(prompt)], padding="max_length", max_length=PROMPT_TOKENS, truncation=True,
                         add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = pipe.text_encoder.device
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    hidden = pipe.text_encoder(ids, mask).last_hidden_state
    length = int(mask.gt(0).sum())
    out = torch.zeros_like(hidden)
    out[:, :length] = hidden[:, :length]
    return out.to(pipe.transformer.dtype if pipe.transformer is not None else pipe.transformer_2.dtype)


FAMILY = WanI2V(
    name="wan-i2v",
    pipeline_class="WanImageToVideoPipeline",
    denoiser="transformer",
    # Wan's reference sampler (and the model cards): 40 steps, guidance 5.0, 81 frames at 16 fps, 480P
    defaults=Defaults(832, 480, 40, 5.0, PROMPT_TOKENS, frames=81, fps=16),
    min_side=256,
    max_side=1280,
    max_pixels=AREA_720P,
    shapes=((832, 480),),
    # patch embedding (a Conv3d, never a Linear), the time / text / image embedders, the per-block and
    # final modulation tables (parameters), the norms and the head stay bf16
    # Only Linears are quantized, so the list names the Linears that stay bf16: the time / text / image
    # embedders and the head. The patch embedding (a Conv3d), the norms (LayerNorm / RMSNorm) and the
    # modulation tables (scale_shift_table parameters) are never FP8Linear candidates.
    quant_skip=(r"condition_embedder\..*", r"proj_out"),
    # WanAttnProcessor reads fused projections, but weights.quantize.fuse_qkv drops the unfused ones and
    # the processor tells I2V blocks by `add_k_proj is not None`; at 32k tokens the three Q/K/V GEMMs are
    # compute-bound anyway (fusion saves launches, not FLOPs), so they stay unfused
    fuse_qkv=False,
    negative_prompt=True,
    # Estimates: transformer 16.4B params (the 14B blocks + image K/V) 32.8 GB bf16, 16.6 GB FP8; UMT5-XXL
    # 11.4 GB; CLIP ViT-H 1.3 GB; VAE 0.25 GB; 480p/81-frame activations and the VAE decode ~15 GB
    vram_gib={"bf16": 57.0, "fp8": 42.0, "int8": 42.0},
    memory=memory_tables(experts=1),
    tiny_defaults=Defaults(64, 64, 2, 5.0, PROMPT_TOKENS, frames=9, fps=16),
    checkpoint_keys="weights.wan_keys",
    max_images=1,
    requires_image=True,
    max_frames=81,
    output_formats=("mp4", "webp"),
    extra_denoisers=("transformer_2",),  # Wan 2.2 A14B's low-noise expert
    # Wan 2.2's per-expert files (lightx2v's high_noise / low_noise LoRAs, Kijai's HIGH / LOW FP8 files)
    experts=(("high", "transformer"), ("low", "transformer_2")),
    tiny_models=("a14b",),  # MODEL=tiny-wan-i2v-a14b: Wan 2.2's two experts, tiny
    job_timeout_s=1800.0,  # 40 CFG steps at 720P run ~15 min on an H200 (480P: ~3 min)
)
