"""`python -m bench coldstart`: a fresh process from start to its first finished image.

The worker's real path (Service.load: preflight, baked FP8 weights from local disk, recipe, compile
cache, warm-up; then one 1024x1024 28-step job), FLUX.1-dev shape with random weights, timed per
phase, three times: (a) no compile cache, (b) the compile cache that (a) saved, (c) that cache with
the baked files evicted from the page cache first (a new machine's disk). Each child gets fresh
inductor/Triton cache folders, so only COMPILE_CACHE_URI carries compiled artifacts over. In (a) and
(b) the baked files sit in the page cache (just written).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = {"prompt": "a red sneaker on a beach", "seed": 7}


def bake_random_flux(out: Path) -> float:
    """Bake a FLUX.1-dev-shape random pipeline to `out` (FP8 denoiser); seconds taken."""
    import torch

    from app.families import FAMILIES
    from bench.models import build_flux_dev
    from weights.bake import bake_pipeline

    t0 = time.perf_counter()
    pipe = build_flux_dev()
    bake_pipeline(pipe, FAMILIES["flux"], out, "fp8", {"id": "random FLUX.1-dev shape", "revision": None}, device="cuda")
    del pipe
    torch.cuda.empty_cache()
    return round(time.perf_counter() - t0, 1)


def child() -> None:
    """Runs in the fresh process: load the worker, run one job, print phases as JSON."""
    t_start = float(os.environ["COLDSTART_T0"])
    t0 = time.time()
    from app.config import Settings
    from app.logs import configure_logging
    from app.service import Service

    t_import = time.time() - t0
    settings = Settings.from_env()
    configure_logging("text", "INFO", [])
    service = Service.load(settings)
    result = service.run(JOB, "coldstart")
    t_end = time.time()
    out = {"interpreter_start_s": round(t0 - t_start, 2), "import_s": round(t_import, 2),
           "phases_ms": result.get("cold_start"), "first_job_ms": result.get("timings", {}).get("total_ms"),
           "process_to_first_image_s": round(t_end - t_start, 2), "error": result.get("error")}
    print("COLDSTART" + json.dumps(out), flush=True)


def run_child(baked: Path, cache: Path, out_dir: Path) -> dict:
    scratch = tempfile.mkdtemp()
    env = dict(os.environ, MODEL=str(baked), COMPILE_CACHE_URI=str(cache), OUTPUT_URI=str(out_dir),
               SHAPES="1024x1024", TORCHINDUCTOR_CACHE_DIR=f"{scratch}/inductor", TRITON_CACHE_DIR=f"{scratch}/triton",
               HF_HUB_OFFLINE="1", COLDSTART_T0=str(time.time()))
    r = subprocess.run([sys.executable, "-m", "bench.coldstart_child"], env=env, capture_output=True, text=True,
                       timeout=400)
    shutil.rmtree(scratch, ignore_errors=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("COLDSTART")]
    return json.loads(lines[-1][9:]) if lines else {"rc": r.returncode, "stderr": r.stderr[-1500:]}


def main(workdir: str = "/tmp/coldstart", baked: str | None = None) -> dict:
    """Bake into `workdir` (or use the baked folder `baked`), then the two fresh-process runs."""
    from bench.latency import versions

    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    res = {"versions": versions(), "model": "FLUX.1-dev shape, random weights, baked FP8 on local disk",
           "job": "1024x1024, 28 steps"}
    if baked is None:
        baked = work / "baked"
        res["bake_s"] = bake_random_flux(baked)
    _write(res)
    cache = work / "compile-cache"
    for name in ("no_cache", "warm_cache", "warm_cache_cold_disk"):
        if name.endswith("cold_disk"):  # the baked files evicted from the page cache: a new machine's disk
            from bench.weights_load import drop_cache

            res["cold_disk_method"] = drop_cache(Path(baked))
        res[name] = run_child(Path(baked), cache, work / "out")
        res[f"{name}_cache_files"] = sorted(p.name for p in cache.glob("*")) if cache.exists() else []
        _write(res)
    return res


def _write(res: dict) -> None:
    from bench.output import save_json

    save_json(res, "coldstart")
