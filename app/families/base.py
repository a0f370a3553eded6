"""What a model family is: the one object that knows everything that differs between FLUX, SDXL, ...

A family names its diffusers pipeline and denoiser, its defaults and size limits, its shape buckets
(warmed before the first job), which denoiser layers stay bf16 under FP8, how a job becomes the
pipeline's call, its tiny random build, and the VRAM preflight expects. The base class holds the
text-to-image behaviour shared by the current families; a family module subclasses what differs.
The model's own config picks the variant (`variant`): never the file name. Family modules import
torch inside their methods: `python -m preflight` resolves the model through them, and must report a
torch that does not import instead of crashing on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

from app.schema import Job, parse_job

StepCallback = Callable[[int, int], None]
WARMUP_STEPS = 2  # two denoiser calls per bucket: the second captures CUDA graphs where they are on


@dataclass(frozen=True)
class Defaults:
    width: int
    height: int
    steps: int
    guidance: float
    max_sequence_length: int | None = None


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str  # the diffusers class named in model_index.json
    denoiser: str  # the pipeline attribute holding the transformer / UNet
    defaults: Defaults
    min_side: int = 256
    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    multiple: int = 16  # sides must be multiples of this (VAE factor x patch size)
    shapes: tuple[tuple[int, int], ...] = ((1024, 1024),)
    # Denoiser modules (regexes of qualified names) that stay bf16 under FP8/INT8: embedders, the final
    # projection and the norm/modulation layers: visible quality for under 1% of the FLOPs.
    quant_skip: tuple[str, ...] = ()
    fuse_qkv: bool = True  # its attention processors use diffusers' fused projections (fuse_qkv_projections)
    negative_prompt: bool = True  # does the pipeline take a negative prompt without extra passes
    # CUDA graphs around the denoiser when CUDA_GRAPHS is unset: on where a step is launch-bound.
    cuda_graphs: bool = False
    vram_gib: dict[str, float] = field(default_factory=dict)  # precision -> GiB needed at the default size
    # precision -> {component: GiB} for the memory plan (preflight.memory.COMPONENTS); empty: from vram_gib
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    tiny_defaults: Defaults | None = None
    checkpoint_keys: str | None = None  # the module mapping published single-file key names (weights import)
    tiny: bool = False  # this is the embedded tiny variant

    # -- identity and variants ---------------------------------------------------------------------
    def skips(self, module_name: str) -> bool:
        """True when `module_name` of the denoiser must not be quantized."""
        return any(re.fullmatch(p, module_name) for p in self.quant_skip)

    def memory_table(self) -> dict[str, dict[str, float]]:
        """precision -> component GiB for preflight's memory plan; a family without measured parts gets
        its `vram_gib` as one resident block (only the resident plan is then told apart)."""
        from preflight.memory import default_table

        return self.memory or {p: default_table(g) for p, g in self.vram_gib.items()}

    def variant(self, denoiser_config) -> "Family":
        """This family as the loaded model's config says (the base: no variants)."""
        return self

    def tiny_variant(self) -> "Family":
        """The embedded tiny model's variant: its own defaults, one warm-up bucket, almost no VRAM."""
        d = self.tiny_defaults or self.defaults
        return replace(self, defaults=d, shapes=((d.width, d.height),), vram_gib={"bf16": 0.5}, memory={},
                       tiny=True)

    def build_tiny(self):
        """The embedded tiny random pipeline (real classes, narrow and shallow): a family module's own."""
        raise NotImplementedError(f"the {self.name} family has no tiny build")

    # -- jobs ----------------------------------------------------------------------------------------
    def call_kwargs(self, job: Job, on_step: StepCallback | None = None) -> dict:
        """The pipeline call for `job`: one generator per image (each image reproducible on its own seed)."""
        import torch

        kw = dict(
            prompt=[job.prompt] * job.num_images,
            height=job.height,
            width=job.width,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in job.seeds],
            output_type="pil",
        )
        if self.negative_prompt and job.negative_prompt:
            kw["negative_prompt"] = [job.negative_prompt] * job.num_images
        if on_step is not None:
            total = job.num_inference_steps

            def _callback(pipe, step, timestep, tensors):
                on_step(step + 1, total)
                return tensors

            kw["callback_on_step_end"] = _callback
        return kw

    def generate(self, pipe, job: Job, on_step: StepCallback | None = None) -> list:
        """Run `job`; return its outputs (PIL images, one per seed)."""
        import torch

        with torch.inference_mode():
            return pipe(**self.call_kwargs(job, on_step)).images

    def warmup_jobs(self, shapes) -> list[Job]:
        """The synthetic short jobs warm-up runs through `generate`: one per bucket, seed 0."""
        return [parse_job({"prompt": "warm up", "width": w, "height": h, "num_inference_steps": WARMUP_STEPS,
                           "seed": 0}, self) for w, h in shapes]

    # -- parts of a job, for the benchmarks (stock vs recipe on the same inputs) ---------------------
    def encode(self, pipe, prompt: str) -> dict:
        """The prompt's embeddings as keyword arguments of the pipeline call."""
        raise NotImplementedError

    def decode(self, pipe, latents, width: int, height: int):
        """The VAE decode of the pipeline's `output_type="latent"` result."""
        raise NotImplementedError

    def denoiser_inputs(self, pipe, width: int, height: int, seed: int = 0) -> dict:
        """Random inputs of one denoiser forward at this size (the fidelity check's)."""
        raise NotImplementedError
