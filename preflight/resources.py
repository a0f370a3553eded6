"""Resource checks: enough free GPU memory for the model and plan, enough disk where weights and
caches go, and the output store reachable and writable with the credentials this worker holds.

Everything arrives as plain values in `Inputs` (the worker fills them from its settings and its
resolved model source); nothing here knows a model family or a storage backend.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from preflight.gpu import GIB, GpuFacts
from preflight.memory import MemoryPlanError, choose_memory_plan, table_for
from preflight.report import Check, fail, first_line, ok, warn

CACHE_MIN_GIB = 2.0  # compile caches (inductor/triton, AOT packages) and scratch under CACHE_DIR


@dataclass(frozen=True)
class Inputs:
    """What one preflight run checks against.

    `vram_gib` maps a precision to the GiB the model needs at its default size (None: unknown), with
    `vram_source` saying where that figure comes from. `embedded`: the model is the embedded tiny one,
    which DEVICE=auto runs on the CPU when there is no GPU. `download_gib`: bytes the hub download will
    put in `hub_cache` (None: nothing to download). `storage`: writes and deletes a probe object under
    the output location and returns a one-line description, or raises with a message naming the cause.
    """

    device: str = "auto"
    precision: str = "auto"
    vram_gib: dict[str, float] | None = None
    vram_source: str = "unknown model"
    embedded: bool = False
    model_label: str = "the model"
    cache_dir: str = "/tmp/diffusion-worker"
    download_gib: float | None = None
    hub_cache: str | None = None
    storage: Callable[[], str] | None = None
    storage_label: str = "output store"
    memory: dict | None = None  # precision -> {component: GiB} (preflight.memory); None: vram_gib only
    memory_plan: str = "auto"  # MEMORY_PLAN
    text_encoders: str = "bf16"  # TEXT_ENCODERS

    def vram_need(self, precision: str) -> float | None:
        table = self.vram_gib or {}
        return table.get(precision, table.get("bf16"))


def check_vram(gpu: GpuFacts, need_gib: float | None, source: str) -> Check:
    """Free memory on device 0 vs what the model and plan need."""
    free, total = gpu.free_bytes / GIB, gpu.total_bytes / GIB
    if need_gib is None:
        return warn("vram", f"{free:.1f} of {total:.1f} GiB free; need unknown ({source})")
    if free < need_gib:
        return fail("vram", f"{free:.1f} of {total:.1f} GiB free but about {need_gib:g} GiB needed ({source}): "
                            "use a larger card, a lighter PRECISION, or free the GPU")
    return ok("vram", f"{free:.1f} of {total:.1f} GiB free; about {need_gib:g} GiB needed ({source})")


def check_vram_for(inputs: Inputs, gpu: GpuFacts, precision: str) -> Check:
    """The vram check for the model under `precision`."""
    return check_vram(gpu, inputs.vram_need(precision), f"{inputs.vram_source} as {precision}")


def check_memory(inputs: Inputs, gpu: GpuFacts, precision: str):
    """(vram check, MemoryPlan or None): the memory plan for this card's free memory and the model's
    component table; without a table, the plain vram check (and MEMORY_PLAN taken as asked)."""
    free = gpu.free_bytes / GIB
    table = table_for(inputs.memory, precision, inputs.text_encoders)
    try:
        plan = choose_memory_plan(inputs.memory_plan, free, table)
    except MemoryPlanError as e:
        return fail("vram", f"{e.message} ({inputs.vram_source} as {precision})"), None
    if table is None:
        return check_vram_for(inputs, gpu, precision), plan
    others = ", ".join(f"{p} {g:g}" for p, g in (plan.alternatives or {}).items() if p != plan.plan)
    return ok("vram", f"memory plan {plan.describe()}; other plans need {others} GiB "
                      f"({inputs.vram_source} as {precision}, text encoders {inputs.text_encoders})",
              memory_free_gib=round(free, 2)), plan


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


def check_disk(inputs: Inputs) -> Check:
    """Free space for caches (CACHE_DIR) and, for a hub model, for the weights download (HF cache)."""
    free, where = free_gib(inputs.cache_dir)
    verdict = disk_verdict("caches", where, free, CACHE_MIN_GIB)
    if verdict.status != "ok" or inputs.download_gib is None or inputs.hub_cache is None:
        return verdict
    hub_free, hub_where = free_gib(inputs.hub_cache)
    # Only a warning: the weights may already be in that cache.
    weights = disk_verdict("weights", hub_where, hub_free, inputs.download_gib, hard=False)
    return weights if weights.status != "ok" else ok("disk", f"{verdict.detail}; {weights.detail}")


def check_storage(inputs: Inputs) -> Check:
    """Put and delete a small object under the output location; failures named, never a secret."""
    if inputs.storage is None:
        return warn("storage", "no output store given: not checked")
    try:
        return ok("storage", inputs.storage())
    except Exception as e:  # e.g. no region or credentials configured: botocore raises before any request
        message = getattr(e, "message", None) or f"{type(e).__name__}: {first_line(e, 120)}"
        return fail("storage", f"{inputs.storage_label} unusable: {message}")
