"""What a model family is: the one object that knows everything that differs between FLUX, SDXL, ...

A family names its diffusers pipeline and denoiser, its defaults and size limits, its shape buckets
(warmed before the first job), which denoiser layers stay bf16 under FP8, how a job becomes the
pipeline's call, its tiny random build, and the VRAM preflight expects. The base class holds the
text-to-image behaviour shared by the current families, image-to-image from the same loaded weights
(`img2img_class`, built with `from_pipe`) and the hooks an edit family (`max_images`,
`requires_image`) overrides for its pipeline's argument names; a family module subclasses what differs.
The model's own config picks the variant (`variant`): never the file name. Family modules import
torch inside their methods: `python -m preflight` resolves the model through them, and must report a
torch that does not import instead of crashing on it.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

from app.errors import WorkerBroken
from app.schema import Job, parse_job

StepCallback = Callable[[int, int], None]
WARMUP_STEPS = 2  # two denoiser calls per bucket: the second captures CUDA graphs where they are on
# A placeholder reference for warm-up jobs of image families: never fetched, the images are made in code.
WARMUP_IMAGE_REF = "data:image/png;base64,"
_derived: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # loaded pipe -> {class name: from_pipe pipeline}


class Warmup(NamedTuple):
    """One warm-up run: the job, its synthetic input images (None for a text job), and the text
    sequence length it forces (a T5 bucket to warm; None: the job's own)."""

    job: Job
    images: list | None = None
    text_length: int | None = None


def step_callback(on_step: StepCallback, total: int):
    """A diffusers `callback_on_step_end` reporting (step done, total) to `on_step`."""

    def _callback(pipe, step, timestep, tensors):
        on_step(step + 1, total)
        return tensors

    return _callback


@dataclass(frozen=True)
class Defaults:
    width: int
    height: int
    steps: int
    guidance: float
    max_sequence_length: int | None = None
    frames: int | None = None  # a video family's default frame count and rate (None: an image family)
    fps: int | None = None


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
    # Further embedded tiny models, MODEL=tiny-<name>-<suffix> (wan-i2v: "a14b", Wan 2.2's two experts);
    # `tiny_model` is the suffix the tiny variant builds ("" for tiny-<name>)
    tiny_models: tuple[str, ...] = ()
    tiny_model: str = ""
    # Input images. max_images 0: the family takes none (a job with one is refused naming the field),
    # unless img2img_class names the diffusers pipeline that runs image-to-image on the loaded weights
    # (built with from_pipe: the same modules, no second copy); then a job sending one image runs it.
    max_images: int = 0
    requires_image: bool = False  # an edit family: a job without an input image is refused (`image`)
    img2img_class: str | None = None
    default_strength: float = 0.8  # image-to-image: how much of the input is re-noised (1 = all of it)
    # Outputs. The first format is the default; a video family (max_frames > 0) takes num_frames
    # (frame_multiple k + 1, the VAE's temporal factor) and fps, and makes one video per job.
    output_formats: tuple[str, ...] = ("png", "jpeg", "webp")
    max_frames: int = 0
    frame_multiple: int = 4
    job_timeout_s: float = 600.0  # JOB_TIMEOUT_S when the variable is unset: what a job of this family needs
    # Further denoisers the recipe also optimizes when the pipeline holds them (Wan 2.2's second expert).
    extra_denoisers: tuple[str, ...] = ()
    # Expert keys of the denoisers (key -> pipeline attribute), for per-denoiser files on the command line:
    # `weights bake --fuse-lora high=FILE`, `weights import low=FILE` (Wan 2.2: high/low noise experts)
    experts: tuple[tuple[str, str], ...] = ()
    # TEXT_BUCKETS applies: the T5 length may be any of app.text_cache.T5_BUCKETS up to the default
    text_buckets: bool = False
    # MagCache's calibrated magnitude ratios: the name of diffusers.hooks.mag_cache's table for this
    # model (None: uncalibrated, the magcache step cache is refused)
    mag_ratios: str | None = None

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

    def for_components(self, components: set[str]) -> "Family":
        """This family as a model holding these pipeline components is planned before it is loaded (the
        memory plan is chosen from model_index.json or a manifest, before any config is read)."""
        return self

    def denoisers_of(self, pipe) -> dict:
        """{pipeline attribute: module} of every denoiser `pipe` holds: the main one, then the extra ones."""
        names = (self.denoiser, *self.extra_denoisers)
        return {n: m for n in names if (m := getattr(pipe, n, None)) is not None}

    def tiny_variant(self, model: str = "") -> "Family":
        """The embedded tiny model's variant (`model`: one of `tiny_models`, or "" for tiny-<name>): its own
        defaults, one warm-up bucket, almost no VRAM."""
        d = self.tiny_defaults or self.defaults
        return replace(self, defaults=d, shapes=((d.width, d.height),), vram_gib={"bf16": 0.5}, memory={},
                       tiny=True, tiny_model=model)

    def build_tiny(self):
        """The embedded tiny random pipeline (real classes, narrow and shallow): a family module's own."""
        raise NotImplementedError(f"the {self.name} family has no tiny build")

    @property
    def makes_video(self) -> bool:
        return self.max_frames > 0

    # -- input images --------------------------------------------------------------------------------
    @property
    def image_limit(self) -> int:
        """How many input images a job may send: max_images, or one for image-to-image."""
        return self.max_images or (1 if self.img2img_class else 0)

    def task(self, with_inputs: bool) -> str:
        """What a job runs: "text" (no input image), "edit" (an edit family) or "img2img"."""
        if not with_inputs:
            return "text"
        return "edit" if self.max_images else "img2img"

    def output_size(self, job: Job, images: list) -> tuple[int, int]:
        """The job's size if it gave one; else the first input image's, fitted to this family's limits."""
        if not job.size_from_input:
            return job.width, job.height
        return self.fit_size(*images[0].size)

    def fit_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) with the aspect ratio kept as closely as the multiple allows: scaled down to
        max_pixels and max_side, up to min_side, each side rounded to the multiple and within bounds."""
        m = self.multiple
        scale = min(1.0, math.sqrt(self.max_pixels / (width * height)), self.max_side / max(width, height))
        scale = max(scale, self.min_side / min(width, height))
        lo, hi = -(-self.min_side // m) * m, self.max_side // m * m
        w, h = (min(hi, max(lo, round(x * scale / m) * m)) for x in (width, height))
        while w * h > self.max_pixels:  # rounding up may cross the pixel cap: take a multiple off the long side
            if w >= h:
                w -= m
            else:
                h -= m
        return w, h

    def pipeline_for(self, pipe, job: Job):
        """The pipeline that runs `job`: the loaded one, or its image-to-image twin for an img2img job."""
        if self.task(bool(job.inputs)) != "img2img":
            return pipe
        return derived_pipeline(pipe, self.img2img_class, self.denoiser)

    def img2img_steps(self, job: Job) -> int:
        """Denoising steps an image-to-image job runs: the noisiest (1 - strength) share is skipped."""
        return int(job.num_inference_steps * job.strength)

    def fit_input(self, image, width: int, height: int):
        """An input image at exactly (width, height), as image-to-image pipelines start from it."""
        from PIL import Image

        return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)

    # -- jobs ----------------------------------------------------------------------------------------
    def call_kwargs(self, job: Job, on_step: StepCallback | None = None, images: list | None = None) -> dict:
        """The pipeline call for `job`: one generator per image (each image reproducible on its own seed).
        An image-to-image job gets its input (one copy per output, each encoded with that output's
        generator, so every image still depends on its own seed only) and `strength`."""
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
        total = job.num_inference_steps
        if images and self.task(True) == "img2img":
            kw["image"] = [self.fit_input(images[0], job.width, job.height)] * job.num_images
            kw["strength"] = job.strength
            total = self.img2img_steps(job)
        if on_step is not None:
            kw["callback_on_step_end"] = step_callback(on_step, total)
        return kw

    def generate(self, pipe, job: Job, on_step: StepCallback | None = None, images: list | None = None,
                 text=None, timings: dict | None = None) -> list:
        """Run `job` (its input images decoded, RGB, in job order; None for a text job); return its
        outputs (PIL images, one per seed). `text` (app.text_cache.TextEncoding) encodes the prompts
        through the worker's cache; `timings` gets the text encode's."""
        import torch

        runner = self.pipeline_for(pipe, job)
        kw = self.call_kwargs(job, on_step, images)
        steps = self.img2img_steps(job) if "strength" in kw else job.num_inference_steps
        with torch.inference_mode():
            kw = self.with_text(runner, job, kw, text, timings)
            with self.step_cache(runner, job, steps):
                return runner(**kw).images

    def step_cache(self, pipe, job: Job, steps: int):
        """The job's step cache (app.step_cache) on every denoiser the pipeline holds, for the job only."""
        from app.step_cache import step_cache

        dens = [d for d in (getattr(pipe, a, None) for a in (self.denoiser, *self.extra_denoisers)) if d is not None]
        return step_cache(dens, job.cache or "off", steps, self.magcache_ratios())

    def magcache_ratios(self):
        """The model's MagCache ratios (a tensor), or None when uncalibrated."""
        if self.mag_ratios is None:
            return None
        from diffusers.hooks import mag_cache

        return getattr(mag_cache, self.mag_ratios)

    # -- text: the prompts as embeddings, through the worker's text-embedding cache ------------------
    def text_extra(self, pipe, job: Job) -> tuple | None:
        """What the embeddings depend on besides prompt, negative prompt and length (the cache key's
        `extra`); None: this family's prompts are left to the pipeline (not cached)."""
        return None

    def encode_text(self, pipe, job: Job, length: int | None) -> dict:
        """The job's prompt (and negative) as pipeline keyword arguments for ONE image."""
        raise NotImplementedError

    def prompt_tokens(self, pipe, prompt: str) -> int:
        """How many tokens the bucketed text encoder sees for `prompt` (families with text_buckets)."""
        raise NotImplementedError

    def length_buckets(self) -> tuple[int, ...]:
        """The sequence lengths TEXT_BUCKETS may pick: T5_BUCKETS below the default, and the default."""
        from app.text_cache import T5_BUCKETS

        cap = self.defaults.max_sequence_length
        return tuple(b for b in T5_BUCKETS if b < cap) + (cap,) if self.text_buckets and cap else (cap,)

    def text_length(self, pipe, job: Job, text) -> int | None:
        """The job's text sequence length: a warm-up's forced one, the smallest bucket holding the prompt
        (TEXT_BUCKETS), or the family's default."""
        cap = self.defaults.max_sequence_length
        if text is None or cap is None:
            return cap
        if text.length is not None:
            return text.length
        if not (text.buckets and self.text_buckets):
            return cap
        from app.text_cache import bucket_for

        return bucket_for(self.prompt_tokens(pipe, job.prompt), self.length_buckets())

    def with_text(self, pipe, job: Job, kw: dict, text, timings: dict | None) -> dict:
        """`kw` with the prompts replaced by their embeddings (from the cache when `text` has one),
        one copy per output image; unchanged for a family whose prompts the pipeline encodes."""
        extra = self.text_extra(pipe, job)
        if extra is None:
            return kw
        from app.text_cache import TextEncoding, TextKey

        text = text or TextEncoding()
        length = self.text_length(pipe, job, text)
        key = TextKey("", self.name, job.prompt, job.negative_prompt, length, extra)
        value = text.embeddings(key, lambda: self.encode_text(pipe, job, length), pipe._execution_device, timings)
        kw = {k: v for k, v in kw.items() if k not in ("prompt", "negative_prompt")}
        if "max_sequence_length" in kw:
            kw["max_sequence_length"] = length
        return {**kw, **repeat_batch(value, job.num_images)}

    def encode_outputs(self, outputs: list, job: Job) -> list:
        """`generate`'s outputs as stored blobs (app.outputs.Encoded), in order: images in the job's format."""
        from app.outputs import encode_image_outputs

        return encode_image_outputs(outputs, job)

    def warmup_jobs(self, shapes) -> list[Warmup]:
        """The synthetic short jobs warm-up runs through `generate`: one per bucket, seed 0. An edit
        family's carry one synthetic input image at the bucket's size, so the reference image's
        tokens are part of the warmed shapes."""
        out = []
        for w, h in shapes:
            raw = {"prompt": "warm up", "width": w, "height": h, "num_inference_steps": WARMUP_STEPS, "seed": 0}
            if self.requires_image:
                raw["image"] = WARMUP_IMAGE_REF
            job = parse_job(raw, self)
            out.append(Warmup(job, [synthetic_image(w, h)] if job.inputs else None))
        return out

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


def repeat_batch(value: dict, n: int) -> dict:
    """One image's embeddings as `n` images' (fresh tensors: the cached ones are never handed out)."""
    import torch

    return {k: v.repeat(n, *(1,) * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v for k, v in value.items()}


def synthetic_image(width: int, height: int, seed: int = 0):
    """A deterministic RGB test card made in code (no file): smooth gradients plus seeded noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-24, 25, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"), "RGB")


def derived_pipeline(pipe, class_name: str, denoiser: str):
    """`class_name` built on `pipe`'s loaded modules with diffusers' `from_pipe`, once per loaded pipe.

    Rebuilt when the loaded pipe's denoiser was swapped since (the recipe wraps or compiles it in
    place). Every module must be the very object the loaded pipe holds: a second copy of the weights
    would double the memory, so it breaks the worker instead of serving.
    """
    import diffusers

    cache = _derived.setdefault(pipe, {})
    built = cache.get(class_name)
    if built is None or getattr(built, denoiser) is not getattr(pipe, denoiser):
        built = getattr(diffusers, class_name).from_pipe(pipe)
        built.set_progress_bar_config(disable=True)
        copied = [name for name, mod in pipe.components.items()
                  if mod is not None and name in built.components and built.components[name] is not mod]
        if copied:
            raise WorkerBroken(f"{class_name}.from_pipe copied {', '.join(copied)} instead of sharing them")
        cache[class_name] = built
    return built
