"""Soak: many sequential jobs through app.service.Service, memory tracked; then a deliberate OOM.

    python -m bench.soak                      # GPU: FLUX.1-dev shape, random weights, 50 x 1024^2 x 28 steps
    python -m bench.soak --tiny --jobs 200    # CPU: the embedded tiny model (what the test suite runs)

The pipeline is built directly on the GPU (bench.models, random weights: speed and memory do not
depend on the weight values) and wrapped in a real Service (validation, step callback, timeout,
encoding, a LocalStore), so every job takes the production path. Per job it records wall time,
torch's allocated / reserved / peak CUDA memory and the process RSS, and reports their drift from
the first measured job: flat VRAM means no tensor survives a job.

Then the OOM check: a ballast tensor takes all free memory but `--headroom` times what a normal job
needs (measured above), so a normal job still fits and the largest valid job (2048x2048 x4) cannot.
Sequence: normal job OK -> oversize job must end `out_of_memory` -> normal job must succeed with the
same ballast held (the failed job's memory was released). `--no-ballast` runs the oversize job on
the bare GPU instead (on 80 GB it may not run out of memory at all; the report says which).

Results: one JSON in $OUT when set, else bench/results/soak_<device>.json. Exit 1 when a check failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; no psutil needed on the GPU image)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cuda_mem() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
            "reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1),
            "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def build_service(tiny: bool, out_dir: str):
    """(Service, job defaults) around a FLUX-shape pipeline: full size on CUDA, or the tiny one on CPU."""
    import torch

    from app.config import Settings
    from app.families import FAMILIES
    from app.service import Service
    from app.source import ModelSource
    from app.storage import LocalStore
    from preflight import Plan

    flux = FAMILIES["flux"]
    if tiny:
        source = ModelSource("tiny", "tiny-flux", flux.tiny_variant())
        pipe, plan = flux.build_tiny(), Plan("cpu", "fp32")
        pipe.set_progress_bar_config(disable=True)
    else:
        from bench.models import build_flux_dev

        from app.optimize import apply_recipe, choose_recipe

        pipe = build_flux_dev("cuda", torch.bfloat16)
        cap = torch.cuda.get_device_capability(0)
        plan = Plan("cuda", "fp8" if cap >= (8, 9) else "bf16", cap, torch.cuda.get_device_name(0))
        # the worker's own recipe (FP8, regional compile): the soak checks what production runs
        apply_recipe(pipe, flux, choose_recipe(plan, Settings(), flux))
        source = ModelSource("hub", "flux-dev-shape-random", flux)
    settings = Settings(model=source.id, output_uri=out_dir, preflight=False, warmup=False, job_timeout_s=3600)
    return Service(pipe, source, settings, plan, LocalStore(out_dir), {})


def run_job(service, job: dict, job_id: str) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = service.run(job, job_id)
    gc.collect()
    rec = {"job": job_id, "ok": "images" in out, "wall_s": round(time.perf_counter() - t0, 3),
           "rss_mib": round(rss_bytes() / 2**20, 1), **cuda_mem()}
    if not rec["ok"]:
        rec["error"] = out["error"]
    for img in out.get("images", []):  # keep the disk flat too
        os.remove(img["url"].removeprefix("file://"))
    return rec


def drift(records: list[dict], key: str) -> dict:
    first, last = records[0][key], records[-1][key]
    peak = max(r[key] for r in records)
    return {"first": first, "last": last, "max": peak, "growth_pct": round((last - first) / first * 100, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=2, help="jobs run before measuring (allocator, cuDNN autotune)")
    ap.add_argument("--size", type=int, default=None, help="side of the soak jobs (default 1024; tiny: 256)")
    ap.add_argument("--steps", type=int, default=None, help="steps of the soak jobs (default 28; tiny: 1)")
    ap.add_argument("--tiny", action="store_true", help="CPU: the embedded tiny model")
    ap.add_argument("--headroom", type=float, default=1.5, help="ballast leaves this x a normal job's need free")
    ap.add_argument("--no-ballast", action="store_true", help="oversize job on the bare GPU")
    args = ap.parse_args(argv)

    import torch

    size = args.size or (256 if args.tiny else 1024)
    steps = args.steps or (1 if args.tiny else 28)
    out_dir = tempfile.mkdtemp(prefix="soak-")
    t0 = time.perf_counter()
    service = build_service(args.tiny, out_dir)
    build_s = round(time.perf_counter() - t0, 1)
    job = {"prompt": "a red sneaker on a beach, studio lighting", "width": size, "height": size,
           "num_inference_steps": steps}

    for i in range(args.warmup):
        run_job(service, dict(job, seed=i), f"warm-{i}")
    records = [run_job(service, dict(job, seed=1000 + i), f"soak-{i:03d}") for i in range(args.jobs)]
    failed = [r for r in records if not r["ok"]]
    device = "cpu" if args.tiny else torch.cuda.get_device_name(0)
    res = {"device": device, "model": service.settings.model, "weights": "random", "size": size, "steps": steps,
           "jobs": args.jobs, "warmup_jobs": args.warmup, "build_s": build_s, "failed_jobs": len(failed),
           "wall_s_median": sorted(r["wall_s"] for r in records)[len(records) // 2],
           "rss": drift(records, "rss_mib")}
    checks = {"all_jobs_ok": not failed}
    if torch.cuda.is_available():
        res["vram_allocated"] = drift(records, "allocated_mib")
        res["vram_reserved"] = drift(records, "reserved_mib")
        res["vram_peak"] = drift(records, "peak_mib")
        # flat: the steady allocation (weights) does not grow by more than 64 MiB over the soak
        checks["vram_flat"] = res["vram_allocated"]["max"] - res["vram_allocated"]["first"] <= 64
        res["oom"] = oom_check(service, job, records, args)
        checks["oom_then_ok"] = res["oom"]["oversize"].get("error", {}).get("type") == "out_of_memory" \
            and res["oom"]["after"]["ok"]
    res["checks"] = checks
    res["records"] = records
    write(res, device)
    return 0 if all(checks.values()) else 1


def oom_check(service, job: dict, records: list[dict], args) -> dict:
    """Normal job, oversize job (must OOM), normal job (must succeed), under a ballast unless --no-ballast."""
    import torch

    need = max(r["peak_mib"] for r in records) - records[-1]["allocated_mib"]  # a normal job's transient memory
    ballast, ballast_mib = None, 0
    if not args.no_ballast:
        free, _total = torch.cuda.mem_get_info()
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info()
        ballast_mib = int(free / 2**20 - need * args.headroom)
        if ballast_mib > 0:
            ballast = torch.empty(ballast_mib * 2**20, dtype=torch.uint8, device="cuda")
    oversize = {"prompt": job["prompt"], "width": 2048, "height": 2048, "num_images": 4, "num_inference_steps": 2}
    before = run_job(service, dict(job, seed=7), "oom-before")
    big = run_job(service, dict(oversize, seed=8), "oom-oversize")
    after = run_job(service, dict(job, seed=9), "oom-after")
    del ballast
    torch.cuda.empty_cache()
    return {"normal_job_need_mib": round(need, 1), "ballast_mib": ballast_mib, "headroom": args.headroom,
            "before": before, "oversize": big, "after": after, "broken": service.broken}


def write(res: dict, device: str) -> None:
    slug = device.replace("NVIDIA ", "").replace(" ", "-").lower()
    folder = os.environ.get("OUT") or "bench/results"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"soak_{slug}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    summary = {k: v for k, v in res.items() if k != "records"}
    print(json.dumps(summary, indent=1), flush=True)
    print(f"written: {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
