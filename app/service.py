"""The worker: `Service.load(settings)` once per process, `Service.run(raw, job_id)` per job.

Both entrypoints (RunPod's handler.py, Modal's modal_app.py) call exactly this; nothing here
imports a platform SDK. `run` never raises: it returns a JobResult dict or a JobError dict, and
sets `broken` when the worker must be replaced.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

from loguru import logger

from app.config import Settings
from app.cost import job_cost
from app.errors import InvalidInput, JobFailed, JobTimeout, OutOfMemory, WorkerBroken, WorkerError
from app.limits import MAX_OUTPUT_BYTES
from app.loading import load_pipeline
from app.logs import redact
from app.outputs import encode_image
from app.schema import CONTENT_TYPES, Job, JobResult, parse_job
from app.checks import run_preflight
from app.source import ModelSource, resolve
from app.storage import OutputStore, object_key, open_store, store_prefix
from preflight import Plan

Progress = Callable[[int, int], None]
CLEANUP_GRACE_S = 2.0  # removing a failed job's partial outputs may run this long past its deadline


@contextmanager
def timed(timings: dict, name: str):
    """Record the block's wall time in ms under `name`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round((time.perf_counter() - t0) * 1000, 1)


class Service:
    def __init__(self, pipe, source: ModelSource, settings: Settings, plan: Plan, store: OutputStore,
                 cold_start: dict):
        self.pipe, self.source, self.settings, self.plan, self.store = pipe, source, settings, plan, store
        # the variant the loaded weights are (FLUX.1-schnell's defaults come from its transformer's config)
        self.family = source.family if source.tiny else source.family.variant(getattr(pipe, source.family.denoiser).config)
        self.cold_start = cold_start  # reported with the first result, then dropped
        self.broken = False

    @classmethod
    def load(cls, settings: Settings, store: OutputStore | None = None, source: ModelSource | None = None,
             loader=load_pipeline) -> "Service":
        """Resolve the model, preflight, open the store, load, optimize and warm the pipeline; time each phase.

        `source` and `loader(source, plan, cache_dir)` stand in for MODEL and its loading (the benches'
        full-size random-weight pipelines take the rest of this path unchanged)."""
        from app import memory

        phases: dict[str, float | str] = {}
        t0 = time.perf_counter()
        with timed(phases, "source_ms"):
            source = source or resolve(settings.model, settings.revision, settings.hf_offline, settings.weights_uri)
            _warmup_jobs(source.family, settings.shapes)  # SHAPES refused before any weight is read
        with timed(phases, "preflight_ms"):
            plan = run_preflight(settings, source)
        with timed(phases, "store_ms"):
            store = store or open_store(settings.output_uri, settings.presign_ttl_s)
        with timed(phases, "weights_ms"):
            pipe = loader(source, plan, settings.cache_dir)
            memory.place(pipe, source.family, plan)
        from app import compile_cache
        from app.optimize import apply_recipe, choose_recipe, warmup

        service = cls(pipe, source, settings, plan, store, phases)
        family = service.family
        warm_jobs = _warmup_jobs(family, settings.shapes)
        recipe = memory.adjust_recipe(choose_recipe(plan, settings, family), plan)
        with timed(phases, "optimize_ms"):
            apply_recipe(pipe, family, recipe)
            memory.finish(pipe, family, plan)
        shapes = [(j.width, j.height) for j in warm_jobs]
        compiled = recipe.compile != "off"
        key = compile_cache.cache_key(plan.gpu_name, plan.capability, source.cache_identity(), recipe.to_dict(),
                                      shapes)
        with timed(phases, "compile_cache_ms"):
            restored = compiled and compile_cache.restore(settings.compile_cache_uri, key)
        if settings.warmup:
            with timed(phases, "warmup_ms"):
                warmup(pipe, family, warm_jobs)
            if compiled and not restored:
                compile_cache.save(settings.compile_cache_uri, key)
        phases["load_total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        phases["memory_plan"] = plan.memory + (" + vae-tiling" if plan.vae_tiling else "")
        logger.info("worker ready: {}", phases)
        return service

    def run(self, raw, job_id: str, progress: Progress | None = None) -> dict:
        """Run one job; return a JobResult dict or {"error": {...}}. Never raises."""
        with logger.contextualize(job_id=job_id):
            try:
                return self._run(raw, job_id, progress)
            except WorkerError as e:
                self.broken = self.broken or isinstance(e, WorkerBroken)
                logger.warning("job failed: {}: {}", e.type, e.message)
                return {"error": e.to_dict()}
            except Exception:  # a bug of ours: the caller gets a clean message, the log the traceback
                logger.exception("job failed with an unexpected error")
                return {"error": {"type": "job_failed", "message": "internal error while running the job"}}

    def _run(self, raw, job_id: str, progress: Progress | None) -> dict:
        if self.broken:
            raise WorkerBroken("this worker is broken and waits to be replaced")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with timed(timings, "validate_ms"):
            job = parse_job(raw, self.family)
            _check_job_id(self.store, job_id)  # before any GPU work: the outputs are stored under it
        logger.info("job: {}x{}, {} steps, {} image(s)", job.width, job.height, job.num_inference_steps, job.num_images)
        logger.debug("prompt: {!r}", job.prompt)
        with timed(timings, "inference_ms"):
            images = self._generate(job, progress, t0)
        with timed(timings, "encode_ms"):
            blobs = [encode_image(im, job.output_format, job.output_quality) for im in images]
        with timed(timings, "upload_ms"):  # under the job's deadline too (a stalled store)
            deadline = time.monotonic() + self.settings.job_timeout_s - (time.perf_counter() - t0)
            outputs = self._upload(job, job_id, images, blobs, deadline)
        timings["total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        cost = job_cost(self.plan.gpu_name, timings["total_ms"] / 1000, self.settings.gpu_price_per_hour)
        result = JobResult(images=outputs, model=self.source.id, timings=timings, cost=cost,
                           cold_start=self.cold_start)
        self.cold_start = None
        logger.info("job done in {} ms", timings["total_ms"])
        return result.model_dump(exclude_none=True)

    def _generate(self, job: Job, progress: Progress | None, t0: float) -> list:
        deadline = t0 + self.settings.job_timeout_s

        def on_step(step: int, total: int) -> None:
            if progress is not None:
                progress(step, total)
            if time.perf_counter() > deadline:
                raise JobTimeout(f"job exceeded JOB_TIMEOUT_S={self.settings.job_timeout_s:g} at step {step}/{total}")

        import torch

        try:
            return self.family.generate(self.pipe, job, on_step)
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first: its traceback pins the activations we must free
        except RuntimeError as e:
            if _allocation_failed(e):
                pass  # an OOM reported by a library (cuBLAS workspace, a kernel launch): same handling
            elif _poisoned(e):
                # scrub before cutting: a secret cut in half no longer matches the log sink's scrubber
                detail = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]
                raise WorkerBroken(f"CUDA error, worker must be replaced: {detail}") from None
            else:
                raise
        release_cuda_memory()
        raise OutOfMemory(f"out of GPU memory at {job.width}x{job.height} x{job.num_images}; "
                          "try fewer images or a smaller size")

    def _upload(self, job: Job, job_id: str, images, blobs, deadline: float | None = None) -> list[dict]:
        total = sum(len(b) for b in blobs)
        if total > MAX_OUTPUT_BYTES:  # parse_job's bound should make this unreachable; never upload past it
            raise JobFailed(f"outputs are {total} bytes, over the {MAX_OUTPUT_BYTES} byte limit")
        ctype = CONTENT_TYPES[job.output_format]
        prefix = store_prefix(self.store)
        keys = [object_key(prefix, job_id, i, job.output_format) for i in range(len(blobs))]
        outputs = []
        try:
            for key, image, blob, seed in zip(keys, images, blobs, job.seeds):
                stored = self.store.put(key, blob, ctype, deadline=deadline)
                outputs.append(dict(url=stored.url, key=stored.key, width=image.width, height=image.height,
                                    seed=seed, content_type=ctype, bytes=stored.bytes))
        except JobFailed as e:
            # A failed job leaves nothing behind: the images already stored, and the one whose PUT
            # may have landed before its answer was lost. Best effort; a retry overwrites anyway.
            # The clean-up gets what is left of the deadline plus CLEANUP_GRACE_S, then gives up.
            cleanup_deadline = None if deadline is None else max(deadline, time.monotonic()) + CLEANUP_GRACE_S
            for key in keys[: len(outputs) + 1]:
                if not self.store.delete(key, deadline=cleanup_deadline):
                    logger.warning("could not remove partial output {}", key)
            if isinstance(e, JobTimeout):
                raise JobTimeout(f"job exceeded JOB_TIMEOUT_S={self.settings.job_timeout_s:g} while storing "
                                 f"its outputs: {e.message}") from None
            raise
        return outputs


def release_cuda_memory() -> None:
    """Return the caching allocator's free blocks after an OOM, so the next job starts clean."""
    import gc

    import torch

    gc.collect()  # the failed forward's activations may sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Messages after which the CUDA context cannot be trusted: a sticky error makes every later kernel
# launch fail (or worse, compute garbage), so the process must go, not the job only.
POISON_MARKERS = ("CUDA error", "CUDA driver error", "device-side assert", "illegal memory access",
                  "unspecified launch failure", "CUBLAS_STATUS", "cuDNN error", "CUDNN_STATUS", "ECC error")


# Allocation failures that arrive as plain RuntimeErrors: not sticky, the context survives them.
OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def _allocation_failed(e: RuntimeError) -> bool:
    return any(s in str(e) for s in OOM_MARKERS)


def _poisoned(e: RuntimeError) -> bool:
    """An error after which the CUDA context cannot be trusted (the process must go)."""
    import torch

    if isinstance(e, getattr(torch, "AcceleratorError", ())):  # torch >= 2.8 raises this for CUDA errors
        return True
    text = str(e)
    return any(s in text for s in POISON_MARKERS)


def _check_job_id(store, job_id) -> None:
    """A job id that cannot name its outputs' keys is refused as input (`id`), not after the denoiser ran."""
    if not isinstance(job_id, str):
        raise InvalidInput(f"id: must be a string, not {type(job_id).__name__}", field="id")
    try:
        object_key(store_prefix(store), job_id, 0, "png")
    except JobFailed as e:
        raise InvalidInput(f"id: {e.message}", field="id") from None


def _warmup_jobs(family, shapes) -> list[Job]:
    """The warm-up jobs for SHAPES (default: the family's buckets); a size the family cannot serve breaks
    the worker at start, naming SHAPES, rather than failing every job of that size later."""
    jobs = []
    for w, h in shapes or family.shapes:
        try:
            jobs += family.warmup_jobs([(w, h)])
        except InvalidInput as e:
            raise WorkerBroken(f"bad configuration SHAPES: {w}x{h}: {e.message} (the {family.name} family: sides "
                               f"{family.min_side}-{family.max_side}, multiples of {family.multiple}, at most "
                               f"{family.max_pixels} pixels)", field="SHAPES") from None
    return jobs
