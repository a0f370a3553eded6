"""`run(inputs) -> Report`: every check in order, each timed; GPU checks skipped in CPU mode.

Disk and storage touch only the filesystem and the network, so they run on a thread while the GPU
checks run: an S3 round trip overlaps CUDA initialisation instead of adding to it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

from loguru import logger

from preflight.gpu import check_arch, check_cuda, check_cudnn, check_driver, check_torch
from preflight.precision import CPU_PLAN, check_precision, check_precision_cpu
from preflight.report import Check, Report, fail, first_line, skipped
from preflight.memory import MemoryPlanError, choose_memory_plan
from preflight.resources import Inputs, check_disk, check_memory, check_storage
from preflight.software import check_pins, check_torchao

GPU_ONLY = ("cuda", "driver", "arch", "cudnn", "precision", "torchao", "pins", "vram")


def timed(check_id: str, fn, *args):
    """Run one check and stamp its time; a check that crashes is a failed check, not a crashed preflight."""
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:
        logger.opt(exception=e).debug("check {} crashed", check_id)
        out = fail(check_id, f"check crashed: {type(e).__name__}: {first_line(e)}")
    check, extra = out if isinstance(out, tuple) else (out, None)
    check.ms = round((time.perf_counter() - t0) * 1000, 1)
    return check, extra


def cpu_mode(inputs: Inputs, cpu: bool | None, torch) -> str | None:
    """Why this run is a CPU run (None: a GPU run). `cpu=None` decides from DEVICE and the model."""
    if cpu is not None:
        return "CPU mode requested" if cpu else None
    if inputs.device == "cpu":
        return "DEVICE=cpu"
    if inputs.device == "auto" and inputs.embedded and torch is not None and not torch.cuda.is_available():
        return f"DEVICE=auto, {inputs.model_label} and no GPU: the embedded model runs on the CPU"
    return None


def _host_checks(inputs: Inputs) -> list[Check]:
    return [timed("disk", check_disk, inputs)[0], timed("storage", check_storage, inputs)[0]]


def _cpu_checks(inputs: Inputs, why: str):
    checks = [skipped(c, f"{why}: GPU check not run") for c in ("cuda", "driver", "arch", "cudnn")]
    precision, plan = timed("precision", check_precision_cpu, inputs.precision)
    try:
        ao = f"torchao {metadata.version('torchao')} installed"
    except metadata.PackageNotFoundError:
        ao = "torchao not installed"
    checks += [precision, skipped("torchao", f"{why}: {ao}; its compiled kernels are GPU kernels"),
               skipped("pins", f"{why}: requirements/gpu.txt applies to the GPU image")]
    plan = plan or CPU_PLAN
    try:  # no GPU memory to weigh: a forced MEMORY_PLAN is applied as asked (its hooks run on the CPU)
        memory = choose_memory_plan(inputs.memory_plan, None, None)
    except MemoryPlanError as e:
        return checks + [fail("vram", e.message)], plan
    checks.append(skipped("vram", f"{why}: no GPU memory to check; memory plan {memory.plan}"))
    return checks, replace(plan, memory=memory.plan, text_encoders=inputs.text_encoders)


def _gpu_checks(inputs: Inputs, torch):
    cuda, gpu = timed("cuda", check_cuda, torch)
    checks = [cuda, timed("driver", check_driver, torch.version.cuda)[0]]
    if gpu is None:  # the worker is done for; importing torchao (about 2 s) would only delay saying so
        checks += [skipped(c, "no usable GPU (see cuda)") for c in ("arch", "cudnn", "precision", "torchao")]
        return checks + [timed("pins", check_pins)[0], skipped("vram", "no usable GPU (see cuda)")], CPU_PLAN
    arch = timed("arch", check_arch, gpu)[0]
    checks.append(arch)
    plan = CPU_PLAN
    if arch.status == "fail":  # every kernel launch would fail the same way: say it once
        checks += [skipped(c, "no kernel image for this card (see arch)") for c in ("cudnn", "precision")]
    else:
        checks.append(timed("cudnn", check_cudnn)[0])
        precision, plan = timed("precision", check_precision, inputs.precision, gpu)
        checks.append(precision)
        plan = plan or CPU_PLAN
    vram, memory = timed("vram", check_memory, inputs, gpu, plan.precision)
    checks += [timed("torchao", check_torchao, plan.precision)[0], timed("pins", check_pins)[0], vram]
    if memory is not None:
        plan = replace(plan, memory=memory.plan, vae_tiling=memory.vae_tiling, text_encoders=inputs.text_encoders)
    return checks, plan


def run(inputs: Inputs, cpu: bool | None = None) -> Report:
    """Check this machine for `inputs` before any weight is read; return the report and its plan.

    `cpu=None` runs in CPU mode when DEVICE=cpu, or DEVICE=auto with the embedded model and no GPU; there the GPU checks are skipped (saying why) and the plan is cpu/fp32.
    """
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="preflight") as pool:
        host = pool.submit(_host_checks, inputs)
        torch_check, torch = timed("torch", check_torch)
        checks = [torch_check]
        why = cpu_mode(inputs, cpu, torch)
        if torch is None:
            checks += [skipped(c, "torch did not import (see torch)") for c in GPU_ONLY]
            plan = CPU_PLAN
        elif why:
            more, plan = _cpu_checks(inputs, why)
            checks += more
        else:
            more, plan = _gpu_checks(inputs, torch)
            checks += more
        checks += host.result()
    report = Report(checks, plan, inputs.precision, round((time.perf_counter() - t0) * 1000, 1))
    _log(report)
    return report


def _log(report: Report) -> None:
    for c in report.checks:
        if c.status == "warn":
            logger.warning("preflight {}: {}", c.id, c.detail)
    if report.ok:
        p = report.plan
        logger.info("preflight ok in {} ms: plan {} {}, memory {}{}", report.elapsed_ms, p.device, p.precision,
                    p.memory, " + VAE tiling" if p.vae_tiling else "")
    else:
        logger.error("preflight failed in {} ms: {}", report.elapsed_ms, report.failures())
