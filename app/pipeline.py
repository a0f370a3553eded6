"""Build or load a diffusers pipeline, run one job through it, and encode the images.

`MODEL` is `tiny-flux` / `tiny-sdxl` (built in code), a local diffusers directory (a baked one
too: it carries a manifest.json), or a Hugging Face id (downloaded unless HF_HUB_OFFLINE=1).
The family is read from the model's own `model_index.json`, never guessed from its name.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from loguru import logger

from app.errors import WorkerBroken
from app.families import Family, family_for_pipeline_class, family_for_tiny
from app.plan import Plan

if TYPE_CHECKING:  # the bake imports this module (resolve_model); the job schema is not in its layer
    from app.schema import Job

StepCallback = Callable[[int, int], None]


def resolve_model(model: str, revision: str | None = None, offline: bool = False) -> tuple[Family, str | None]:
    """(family, local directory or None for a hub id) for a MODEL value; reads only model_index.json."""
    fam = family_for_tiny(model)
    if fam is not None:
        return fam, None
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise WorkerBroken(f"MODEL={model} is a folder without model_index.json", field="MODEL")
        return family_for_pipeline_class(json.loads(index.read_text())["_class_name"]), str(path)
    try:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(model, "model_index.json", revision=revision, local_files_only=offline)
    except Exception as e:  # not found, offline and not cached, gated...
        raise WorkerBroken(f"MODEL={model}: cannot read model_index.json ({type(e).__name__})", field="MODEL") from None
    return family_for_pipeline_class(json.loads(Path(index).read_text())["_class_name"]), None


def load_pipeline(model: str, plan: Plan, revision: str | None = None, offline: bool = False,
                  weights_uri: str | None = None, cache_dir: str = "/tmp/diffusion-worker"):
    """(pipeline on plan.device in plan's dtype, family). Baked directories go through weights.load;
    WEIGHTS_URI (a baked directory on S3) takes precedence over MODEL and is streamed, hash-checked.

    `pipe.source_model` names the model the weights come from: MODEL for a tiny build or a hub id /
    plain directory, the manifest's source for a baked directory or a stream (a baked tiny-flux is
    still tiny-flux: it gets the tiny defaults, 256x256 in 4 steps, not FLUX.1's 1024x1024 in 28)."""
    if weights_uri:
        from weights.stream import stream_baked

        pipe, family = stream_baked(weights_uri, plan, cache_dir)
        pipe.set_progress_bar_config(disable=True)
        logger.info("loaded {} ({} family) on {} as {}", weights_uri, family.name, plan.device, plan.torch_dtype)
        return pipe, family
    family, local = resolve_model(model, revision, offline)
    if family_for_tiny(model):
        pipe = family.tiny().to(plan.device, plan.torch_dtype)
    elif local and (Path(local) / "manifest.json").is_file():
        from weights.load import load_baked

        pipe = load_baked(local, plan)  # sets source_model from the manifest
    else:
        import diffusers

        cls = getattr(diffusers, family.pipeline_class)
        pipe = cls.from_pretrained(local or model, revision=revision, torch_dtype=plan.torch_dtype,
                                   local_files_only=offline).to(plan.device)
    if getattr(pipe, "source_model", None) is None:
        pipe.source_model = model
    pipe.set_progress_bar_config(disable=True)
    # diffusers warns with the cut-off part of a long prompt ("...was truncated...: ['<prompt text>']"),
    # which would put prompts in the worker's log at WARNING. Loading is done: keep only its errors.
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    logger.info("loaded {} ({} family) on {} as {}", model, family.name, plan.device, plan.torch_dtype)
    return pipe, family


def call_kwargs(family: Family, job: Job, on_step: StepCallback | None = None) -> dict:
    """The pipeline call for `job`: one generator per image (each image reproducible on its own seed)."""
    kw = dict(
        prompt=[job.prompt] * job.num_images,
        height=job.height,
        width=job.width,
        num_inference_steps=job.num_inference_steps,
        guidance_scale=job.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(s) for s in job.seeds],
        output_type="pil",
    )
    if family.negative_prompt and job.negative_prompt:
        kw["negative_prompt"] = [job.negative_prompt] * job.num_images
    if job.max_sequence_length:
        kw["max_sequence_length"] = job.max_sequence_length
    if on_step is not None:
        total = job.num_inference_steps

        def _callback(pipe, step, timestep, tensors):
            on_step(step + 1, total)
            return tensors

        kw["callback_on_step_end"] = _callback
    return kw


def generate(pipe, family: Family, job: Job, on_step: StepCallback | None = None) -> list:
    """Run `job` and return its PIL images (one per seed)."""
    with torch.inference_mode():
        return pipe(**call_kwargs(family, job, on_step)).images


def encode_image(image, fmt: str, quality: int) -> bytes:
    """PNG (lossless; quality ignored), JPEG or WEBP at `quality`."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format=fmt.upper(), quality=quality)
    return buf.getvalue()
