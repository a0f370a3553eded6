"""Resource checks: enough free GPU memory for the model and plan, enough disk where weights and
caches go, and the output store reachable and writable with the credentials this worker holds."""

from __future__ import annotations

import shutil
from pathlib import Path

from app.config import Settings
from app.errors import JobFailed, WorkerBroken
from app.storage import open_store, s3_client
from preflight.gpu import GIB, GpuFacts
from preflight.report import Check, fail, first_line, ok, warn

TINY_VRAM_GIB = 0.5  # the embedded tiny models need almost nothing; this leaves room for the CUDA context
CACHE_MIN_GIB = 2.0  # compile caches (inductor/triton, AOT packages) and scratch under CACHE_DIR


def vram_need(settings: Settings, precision: str) -> tuple[float | None, str]:
    """(GiB needed at 1024x1024, where the figure comes from) for MODEL under `precision`.

    An estimate per family (app.families.vram_gib); the weights manifest will refine it. Reads only
    the model's model_index.json, as loading would first.
    """
    from app.pipeline import resolve_model

    if settings.model.startswith("tiny-"):
        return TINY_VRAM_GIB, "embedded tiny model"
    try:
        family, _ = resolve_model(settings.model, settings.revision, settings.hf_offline)
    except WorkerBroken as e:
        return None, e.message
    need = family.vram_gib.get(precision, family.vram_gib.get("bf16"))
    return need, f"{family.name} family estimate as {precision}"


def check_vram(gpu: GpuFacts, need_gib: float | None, source: str) -> Check:
    """Free memory on device 0 vs what the model and plan need."""
    free, total = gpu.free_bytes / GIB, gpu.total_bytes / GIB
    if need_gib is None:
        return warn("vram", f"{free:.1f} of {total:.1f} GiB free; need unknown ({source})")
    if free < need_gib:
        return fail("vram", f"{free:.1f} of {total:.1f} GiB free but about {need_gib:g} GiB needed ({source}): "
                            "use a larger card, a lighter PRECISION, or free the GPU")
    return ok("vram", f"{free:.1f} of {total:.1f} GiB free; about {need_gib:g} GiB needed ({source})")


def check_vram_for(settings: Settings, gpu: GpuFacts, precision: str) -> Check:
    """The vram check for MODEL under `precision` (the estimate and the comparison, timed together)."""
    return check_vram(gpu, *vram_need(settings, precision))


def free_gib(path: str | Path) -> tuple[float, Path]:
    """(free GiB, the existing folder measured) for `path` or its nearest existing parent."""
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / GIB, p


def disk_verdict(label: str, where: Path, free: float, need: float, hard: bool = True) -> Check:
    """ok when `free` >= `need` GiB; otherwise fail (or warn when not `hard`)."""
    if free >= need:
        return ok("disk", f"{label}: {free:.1f} GiB free at {where} (>= {need:g})")
    text = f"{label}: {free:.1f} GiB free at {where}, need {need:g} GiB: mount a larger volume or move it"
    return fail("disk", text) if hard else warn("disk", text)


def check_disk(settings: Settings) -> Check:
    """Free space for caches (CACHE_DIR) and, for a hub model, for the weights download (HF cache)."""
    free, where = free_gib(settings.cache_dir)
    verdict = disk_verdict("caches", where, free, CACHE_MIN_GIB)
    if verdict.status != "ok" or settings.model.startswith("tiny-") or Path(settings.model).is_dir():
        return verdict
    need, _ = vram_need(settings, "bf16")  # bf16 weights take about what they take in VRAM
    if need is None:
        return verdict
    from huggingface_hub import constants

    hub_free, hub_where = free_gib(constants.HF_HUB_CACHE)
    # Only a warning: the weights may already be in that cache.
    weights = disk_verdict("weights", hub_where, hub_free, need, hard=False)
    return weights if weights.status != "ok" else ok("disk", f"{verdict.detail}; {weights.detail}")


def check_storage(settings: Settings) -> Check:
    """Put and delete a small object under OUTPUT_URI's prefix; S3 failures named, never a secret."""
    uri = settings.output_uri
    # Short timeouts and one retry: preflight must answer in seconds, the job path keeps its own retries.
    client = s3_client(connect_timeout=2, read_timeout=5, max_attempts=2) if uri.startswith("s3://") else None
    try:
        return ok("storage", open_store(uri, settings.presign_ttl_s, client=client).check())
    except (JobFailed, WorkerBroken) as e:
        return fail("storage", e.message)
    except Exception as e:  # e.g. no region or credentials configured: botocore raises before any request
        return fail("storage", f"{uri.split('://')[0]} store unusable: {type(e).__name__}: {first_line(e, 120)}")
