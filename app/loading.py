"""Load the pipeline a ModelSource names, on the plan's device and dtype: one road in, one way out.

Tiny models are built in code; baked directories and WEIGHTS_URI streams go through `weights` (FP8
tensors straight into a meta skeleton); hub ids and plain folders through diffusers' from_pretrained.
Weight errors become WorkerBroken here: a worker with bad weights must be replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loguru import logger

from app.errors import WorkerBroken
from app.memory import load_device
from app.source import ModelSource
from weights.errors import WeightsError
from weights.load import Target

if TYPE_CHECKING:  # the bake (`python -m weights bake`) reads models through here without preflight/
    from preflight import Plan


def target(plan: Plan) -> Target:
    """The weights package's view of a plan: device string, dtype of plain floats, capability. Weights
    go to host memory first when the memory plan streams some of them (app.memory.place moves the rest)."""
    device = load_device(plan)
    return Target("cuda:0" if device == "cuda" else device, plan.torch_dtype, plan.capability, plan.precision)


def load_pipeline(source: ModelSource, plan: Plan, cache_dir: str = "/tmp/diffusion-worker", s3=None):
    """The pipeline for `source` on plan.device in plan's dtype; `s3` makes the client of a stream."""
    try:
        pipe = _load(source, plan, cache_dir, s3)
    except WeightsError as e:
        raise WorkerBroken(f"weights of {source.id}: {e.message}") from None
    pipe.set_progress_bar_config(disable=True)
    # diffusers warns with the cut-off part of a long prompt ("...was truncated...: ['<prompt text>']"),
    # which would put prompts in the worker's log at WARNING. Loading is done: keep only its errors.
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    logger.info("loaded {} on {} as {}", source.describe(), plan.device, plan.torch_dtype)
    return pipe


def _load(source: ModelSource, plan: Plan, cache_dir: str, s3):
    if source.kind == "tiny":
        return source.family.build_tiny().to(load_device(plan), plan.torch_dtype)
    if source.kind == "baked":
        from weights.load import load_baked

        return load_baked(source.location, target(plan), source.manifest)
    if source.kind == "stream":
        from app.storage import describe_s3_error, parse_s3_uri, s3_client
        from weights.stream import WORKERS, stream_baked

        bucket, prefix = parse_s3_uri(source.location, field="WEIGHTS_URI")
        client = (s3 or (lambda: s3_client(max_pool_connections=WORKERS)))()
        return stream_baked(client, bucket, prefix, source.manifest, target(plan), cache_dir, describe_s3_error)
    import diffusers

    cls = getattr(diffusers, source.family.pipeline_class)
    return cls.from_pretrained(source.location, revision=source.revision, torch_dtype=plan.torch_dtype,
                               local_files_only=source.offline).to(load_device(plan))


def source_pipeline(source: ModelSource, dtype=None):
    """The source model's pipeline in bf16 on the CPU, as `python -m weights bake` reads it."""
    import torch

    dtype = dtype or torch.bfloat16
    if source.kind == "tiny":
        return source.family.build_tiny().to(dtype)
    if source.kind in ("baked", "stream"):
        raise WorkerBroken(f"MODEL={source.location}: already baked; bake from the original model", field="MODEL")
    import diffusers

    cls = getattr(diffusers, source.family.pipeline_class)
    return cls.from_pretrained(source.location, revision=source.revision, torch_dtype=dtype,
                               local_files_only=source.offline)
