"""The worker: `Service.load(settings)` once per process, `Service.run(raw, job_id)` per job.

Both entrypoints (RunPod's handler.py, Modal's modal_app.py) call exactly this; nothing here
imports a platform SDK. `run` never raises: it returns a JobResult dict or a JobError dict, and
sets `broken` when the worker must be replaced.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

from loguru import logger

from app.config import Settings
from app.cost import job_cost
from app.errors import InvalidInput, JobFailed, JobTimeout, OutOfMemory, WorkerBroken, WorkerError
from app.fetch import FetchLimits
from app.gpu_errors import allocation_failed, poisoned, release_cuda_memory
from app.inputs import load_inputs
from app.limits import MAX_LORA_BYTES, MAX_OUTPUT_BYTES
from app.loading import load_pipeline
from app.logs import redact
from app.lora import Loras, refuse_unless_taken
from app.outputs import Encoded
from app.schema import Job, JobResult, parse_job
from app.checks import run_preflight
from app.source import ModelSource, resolve
from app import step_cache
from app.storage import OutputStore, object_key, open_store, s3_client, store_prefix
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
    # How input images are fetched. Never from the environment: tests open the address guard's seam on
    # an instance (FetchLimits.allow_networks), no deployment can.
    fetch_limits: FetchLimits = FetchLimits()
    lora_max_bytes: int = MAX_LORA_BYTES  # one LoRA file's cap (tests lower it on an instance)

    def __init__(self, pipe, source: ModelSource, settings: Settings, plan: Plan, store: OutputStore,
                 cold_start: dict):
        self.pipe, self.source, self.settings, self.plan, self.store = pipe, source, settings, plan, store
        # the variant the loaded weights are (FLUX.1-schnell's defaults come from its transformer's config),
        # with a bake's own defaults (a fused few-step LoRA's steps and guidance)
        self.family = source.serving_family(getattr(pipe, source.family.denoiser).config)
        self.cold_start = cold_start  # reported with the first result, then dropped
        self.broken = False
        self._s3 = None  # the boto3 client s3:// inputs are read with, made on the first such job
        from app.text_cache import TextEncoding

        self.text = TextEncoding.from_settings(settings, source.cache_identity())  # TEXT_CACHE_MB, TEXT_BUCKETS
        self.compiled = False  # set by load when the recipe compiles: jobs then watch for recompiles
        # the applied Recipe, and every (width, height, num_images) warm-up then jobs ran, in order: what a
        # job's first run costs follows from them (app.optimize.first_run_cost)
        self.recipe = None
        self.warmed: list = []
        # why a step cache cannot run here (None: it can); load refines it with the recipe (CUDA graphs)
        self.step_cache_blocked = step_cache.unsupported(getattr(pipe, self.family.denoiser), None)
        self.loras: Loras | None = None  # on a worker started with LORAS=1

    @property
    def job_timeout_s(self) -> float:
        """JOB_TIMEOUT_S, or the family's default when it is unset (a video job runs minutes)."""
        return self.settings.job_timeout_s or self.family.job_timeout_s

    @classmethod
    def load(cls, settings: Settings, store: OutputStore | None = None, source: ModelSource | None = None,
             loader=load_pipeline) -> "Service":
        """Resolve the model, preflight, open the store, load, optimize and warm the pipeline; time each phase.

        `source` and `loader(source, plan, cache_dir)` stand in for MODEL and its loading (the benches'
        full-size random-weight pipelines take the rest of this path unchanged)."""
        t0 = time.perf_counter()
        if settings.prefetch_weights:  # first: the kernel reads the files while the rest of load imports
            from weights.pagecache import prefetch

            prefetch(settings.model)
        from app import memory

        phases: dict[str, float | str] = {}
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
        from app.optimize import apply_recipe, choose_recipe, warmup, warmup_plan

        service = cls(pipe, source, settings, plan, store, phases)
        family = service.family
        recipe = memory.adjust_recipe(choose_recipe(plan, settings, family), plan)
        warm_jobs = warmup_plan(family, _warmup_jobs(family, settings.shapes), recipe,
                                family.length_buckets() if settings.text_buckets else ())
        with timed(phases, "optimize_ms"):
            apply_recipe(pipe, family, recipe)
            memory.finish(pipe, family, plan)
            if recipe.lora_rank:
                service.loras = Loras.from_settings(pipe, family, settings, recipe.lora_rank)
        compiled = service.compiled = recipe.compile != "off"
        service.recipe = recipe
        service.step_cache_blocked = step_cache.unsupported(getattr(pipe, family.denoiser), recipe)
        warm_jobs = step_cache.warm_with_default(warm_jobs, settings.step_cache, service.step_cache_blocked,
                                                 family.mag_ratios, source.id)
        shapes = [(w.job.width, w.job.height, w.job.num_images) for w in warm_jobs]
        key = compile_cache.cache_key(plan.gpu_name, plan.capability, source.cache_identity(), recipe.to_dict(),
                                      shapes)
        with timed(phases, "compile_cache_ms"):
            restored = compiled and compile_cache.restore(settings.compile_cache_uri, key)
        if settings.warmup:
            with timed(phases, "warmup_ms"):
                warmup(pipe, family, warm_jobs, service.text)
            service.warmed = list(shapes)
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
            job = step_cache.for_job(parse_job(raw, self.family), self.settings.step_cache,
                                     self.step_cache_blocked, self.family.mag_ratios, self.source.id)
            _check_job_id(self.store, job_id)  # before any GPU work: the outputs are stored under it
            refuse_unless_taken(self.loras, job)
        inputs = None
        if job.inputs:  # fetched and decoded before any GPU work; the size may follow the first image
            with timed(timings, "inputs_ms"):
                deadline = time.monotonic() + self.job_timeout_s - (time.perf_counter() - t0)
                inputs = load_inputs(job, self._fetch_limits(job), deadline)
                job = job.with_size(*self.family.output_size(job, inputs))
        applied = None
        if self.loras is not None:  # a job without LoRAs clears the last job's
            with timed(timings, "loras_ms"):
                deadline = time.monotonic() + self.job_timeout_s - (time.perf_counter() - t0)
                limits = self._fetch_limits(job, [ref.source for ref in job.loras or ()])
                applied = self.loras.for_job(job, limits, self.lora_max_bytes, deadline)
        logger.info("job: {} {}x{}{}, {} steps, {} output(s)", self.family.task(bool(job.inputs)), job.width,
                    job.height, f"x{job.num_frames} frames" if job.num_frames else "", job.num_inference_steps,
                    job.num_images)
        logger.debug("prompt: {!r}", job.prompt)
        with timed(timings, "inference_ms"):  # the text encode included (text_encode_ms, text_cache: hit|miss|off)
            outputs = self._generate(job, progress, t0, inputs, timings)
        with timed(timings, "encode_ms"):  # the family's format: images, or a video and its poster
            encoded = self.family.encode_outputs(outputs, job)
        with timed(timings, "upload_ms"):  # under the job's deadline too (a stalled store)
            deadline = time.monotonic() + self.job_timeout_s - (time.perf_counter() - t0)
            stored = self._upload(job_id, encoded, deadline)
        timings["total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        cost = job_cost(self.plan.gpu_name, timings["total_ms"] / 1000, self.settings.gpu_price_per_hour)
        videos = [entry for entry, enc in zip(stored, encoded) if enc.kind == "videos"]
        result = JobResult(images=[entry for entry, enc in zip(stored, encoded) if enc.kind == "images"],
                           videos=videos or None, model=self.source.id, timings=timings, cost=cost,
                           cold_start=self.cold_start, loras=applied or None)
        self.cold_start = None
        logger.info("job done in {} ms", timings["total_ms"])
        return result.model_dump(exclude_none=True)

    def _fetch_limits(self, job: Job, refs=None) -> FetchLimits:
        """The fetch limits with the worker's S3 client when the job reads an s3:// input (made once)."""
        limits = self.fetch_limits
        refs = job.inputs if refs is None else refs
        if limits.s3_client is None and any(ref[:5].lower() == "s3://" for ref in refs):
            if self._s3 is None:
                self._s3 = s3_client(limits.connect_timeout_s, limits.read_timeout_s, max_attempts=3)
            limits = replace(limits, s3_client=self._s3)
        return limits

    def _generate(self, job: Job, progress: Progress | None, t0: float, inputs: list | None = None,
                  timings: dict | None = None) -> list:
        deadline = t0 + self.job_timeout_s

        def on_step(step: int, total: int) -> None:
            if progress is not None:
                progress(step, total)
            if time.perf_counter() > deadline:
                raise JobTimeout(f"job exceeded JOB_TIMEOUT_S={self.job_timeout_s:g} at step {step}/{total}")

        import torch

        try:
            if not self.compiled:
                return self.family.generate(self.pipe, job, on_step, inputs, self.text, timings)
            from app.optimize import first_run_cost, graphs_compiled

            shape = (job.width, job.height, job.num_images)
            expected = first_run_cost(self.recipe, self.warmed, *shape) == "compile"
            if expected:
                logger.info("job at {}x{} x{} compiles its graphs in this job (DYNAMIC={}: not warmed)",
                            *shape, self.recipe.dynamic)
            if shape not in self.warmed:  # its graphs exist from now on, compiled or not
                self.warmed.append(shape)
            before = graphs_compiled()
            images = self.family.generate(self.pipe, job, on_step, inputs, self.text, timings)
            if graphs_compiled() > before and not expected:  # the rule was wrong: say so where it is seen
                logger.warning("job at {}x{} x{} compiled {} new graph(s): a shape warm-up did not cover",
                               job.width, job.height, job.num_images, graphs_compiled() - before)
            return images
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first: its traceback pins the activations we must free
        except RuntimeError as e:
            if allocation_failed(e):
                pass  # an OOM reported by a library (cuBLAS workspace, a kernel launch): same handling
            elif poisoned(e):
                # scrub before cutting: a secret cut in half no longer matches the log sink's scrubber
                detail = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]
                raise WorkerBroken(f"CUDA error, worker must be replaced: {detail}") from None
            else:
                raise
        release_cuda_memory()
        raise OutOfMemory(f"out of GPU memory at {job.width}x{job.height} x{job.num_images}; "
                          "try fewer images or a smaller size")

    def _upload(self, job_id: str, encoded: list[Encoded], deadline: float | None = None) -> list[dict]:
        """Store each output (and a video's poster beside it, `{index}.poster.png`); their result entries."""
        blobs = [(i, out) for i, enc in enumerate(encoded) for out in (enc, enc.poster) if out is not None]
        total = sum(len(out.blob) for _, out in blobs)
        if total > MAX_OUTPUT_BYTES:  # parse_job's bound should make this unreachable; never upload past it
            raise JobFailed(f"outputs are {total} bytes, over the {MAX_OUTPUT_BYTES} byte limit")
        prefix = store_prefix(self.store)
        keys = [object_key(prefix, job_id, i, out.ext) for i, out in blobs]
        outputs: list[dict] = []
        done = 0
        try:
            for key, (i, out) in zip(keys, blobs):
                stored = self.store.put(key, out.blob, out.content_type, deadline=deadline)
                done += 1
                entry = dict(url=stored.url, key=stored.key, content_type=out.content_type, bytes=stored.bytes)
                if out is encoded[i]:
                    outputs.append({**entry, **out.meta})
                else:  # the poster of the output just stored
                    outputs[-1]["poster"] = entry
        except JobFailed as e:
            # A failed job leaves nothing behind: the images already stored, and the one whose PUT
            # may have landed before its answer was lost. Best effort; a retry overwrites anyway.
            # The clean-up gets what is left of the deadline plus CLEANUP_GRACE_S, then gives up.
            cleanup_deadline = None if deadline is None else max(deadline, time.monotonic()) + CLEANUP_GRACE_S
            for key in keys[: done + 1]:
                if not self.store.delete(key, deadline=cleanup_deadline):
                    logger.warning("could not remove partial output {}", key)
            if isinstance(e, JobTimeout):
                raise JobTimeout(f"job exceeded JOB_TIMEOUT_S={self.job_timeout_s:g} while storing "
                                 f"its outputs: {e.message}") from None
            raise
        return outputs


def _check_job_id(store, job_id) -> None:
    """A job id that cannot name its outputs' keys is refused as input (`id`), not after the denoiser ran."""
    if not isinstance(job_id, str):
        raise InvalidInput(f"id: must be a string, not {type(job_id).__name__}", field="id")
    try:
        object_key(store_prefix(store), job_id, 0, "png")
    except JobFailed as e:
        raise InvalidInput(f"id: {e.message}", field="id") from None


def _warmup_jobs(family, shapes) -> list:
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
