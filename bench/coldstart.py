"""`python -m bench coldstart`: a fresh process from start to its first finished image, then the first jobs.

The worker's real path (Service.load: preflight, baked FP8 weights from local disk, recipe, compile
cache, warm-up of the family's SHAPES; then one job at the default size), FLUX.1-dev shape with
random weights, timed per phase, in up to three fresh processes: (a) `no_cache`, (b) `warm_cache`,
the compile cache (a) saved, (c) `cold_disk`, that cache with the baked files evicted from the page
cache first (a new machine's disk). Each child gets fresh Inductor/Triton cache folders, so only
COMPILE_CACHE_URI carries compiled artifacts over.

The first-jobs table (in the `--table-in` run, after its first job): through `Service.run`, each job
at num_images 1-4 at each bucket and at two off-bucket sizes, run twice: its first run after warm-up
and the same job warmed, with the result's timings per phase, the graphs Dynamo compiled during each
run, and what the worker's rule (app.optimize.first_run_cost) said the first run would pay. A job
that paid a compile shows as first/warm well above 1. `--dynamic` runs the worker with that DYNAMIC.
`--budget` bounds the whole command: rows and runs that would start past it are listed as skipped.
`--tiny`: the embedded tiny model on the CPU (no bake, no compile): the plumbing only.
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
RUNS = ("no_cache", "warm_cache", "cold_disk")
MARGIN_S = 15.0  # a child's teardown and the parent's bookkeeping after its deadline


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


def off_bucket_sizes(family, count: int = 2) -> list[tuple[int, int]]:
    """Sizes no bucket has, inside the family's limits: from the first bucket, the aspect ratio turned
    (1024x1024 -> 832x1216, 1152x896 for FLUX), then small steps for a family whose limits leave no room."""
    w, h = family.shapes[0]
    m = family.multiple
    candidates = [(w - 12 * m, h + 12 * m), (w + 8 * m, h - 8 * m), (w + 4 * m, h), (w, h + 2 * m),
                  (w + 2 * m, h + 2 * m)]
    out = []
    for cw, ch in candidates:
        ok = (family.min_side <= min(cw, ch) and max(cw, ch) <= family.max_side and cw * ch <= family.max_pixels
              and (cw, ch) not in family.shapes and (cw, ch) not in out)
        if ok:
            out.append((cw, ch))
    return out[:count]


def table_rows(family, num_images=(1, 2, 3, 4), off_bucket=None) -> list[tuple[int, int, int]]:
    """(width, height, num_images) per row: the first bucket, the first off-bucket size, then the rest
    alternating, so a budget that cuts the table still covers both kinds of size."""
    buckets = list(family.shapes)
    offs = list(off_bucket) if off_bucket is not None else off_bucket_sizes(family)
    sizes = []
    while buckets or offs:
        sizes += [s.pop(0) for s in (buckets, offs) if s]
    return [(w, h, n) for w, h in sizes for n in num_images]


def _graphs() -> int:
    from app.optimize import graphs_compiled

    return graphs_compiled()


def first_jobs(service, rows, deadline: float, steps: int | None = None) -> dict:
    """Each row's job run twice through `service.run` (first after warm-up, then warmed), until `deadline`."""
    from app.optimize import first_run_cost

    done, skipped, last_s = [], [], 0.0
    for w, h, n in rows:
        if time.time() + 2.2 * last_s * max(1, n) > deadline:  # two runs of about the last row's time per image
            skipped.append(f"{w}x{h}x{n}")
            continue
        job = dict(JOB, width=w, height=h, num_images=n, **({"num_inference_steps": steps} if steps else {}))
        rule = first_run_cost(service.recipe, service.warmed, w, h, n) if service.recipe else "none"
        row = {"size": f"{w}x{h}", "num_images": n, "rule": rule}
        t0 = time.time()
        for run in ("first", "warm"):
            before = _graphs()
            res = service.run(dict(job), f"coldstart-{w}x{h}x{n}-{run}")
            row[run] = {"timings": res.get("timings"), "graphs_compiled": _graphs() - before}
            if "error" in res:
                row[run]["error"] = res["error"]
                break
        first, warm = (row.get(k, {}).get("timings") or {} for k in ("first", "warm"))
        if first.get("total_ms") and warm.get("total_ms"):
            row["first_over_warm"] = round(first["total_ms"] / warm["total_ms"], 2)
        last_s = (time.time() - t0) / 2 / max(1, n)
        done.append(row)
    return {"rows": done, "skipped": skipped}


def child() -> None:
    """Runs in the fresh process: load the worker, run one job (and the table), print phases as JSON."""
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
           "process_to_first_image_s": round(t_end - t_start, 2), "error": result.get("error"),
           "dynamic_setting": settings.dynamic, "recipe": service.recipe.to_dict() if service.recipe else None,
           "warmed": service.warmed[:]}
    spec = os.environ.get("COLDSTART_TABLE")
    if spec:
        spec = json.loads(spec)
        out["first_jobs"] = first_jobs(service, [tuple(r) for r in spec["rows"]], spec["deadline"], spec["steps"])
    print("COLDSTART" + json.dumps(out), flush=True)


def run_child(model: str, cache: Path, out_dir: Path, timeout_s: float, dynamic: str | None = None,
              table: dict | None = None, shapes: str | None = None) -> dict:
    scratch = tempfile.mkdtemp()
    env = dict(os.environ, MODEL=model, COMPILE_CACHE_URI=str(cache), OUTPUT_URI=str(out_dir),
               TORCHINDUCTOR_CACHE_DIR=f"{scratch}/inductor", TRITON_CACHE_DIR=f"{scratch}/triton",
               HF_HUB_OFFLINE="1", COLDSTART_T0=str(time.time()))
    env.pop("SHAPES", None)
    env.pop("COLDSTART_TABLE", None)
    if shapes:
        env["SHAPES"] = shapes
    if dynamic:
        env["DYNAMIC"] = dynamic
    if table:
        env["COLDSTART_TABLE"] = json.dumps(table)
    try:
        r = subprocess.run([sys.executable, "-m", "bench.coldstart_child"], env=env, capture_output=True, text=True,
                           timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s (--budget)"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("COLDSTART")]
    return json.loads(lines[-1][9:]) if lines else {"rc": r.returncode, "stderr": r.stderr[-1500:]}


def main(workdir: str = "/tmp/coldstart", baked: str | None = None, tiny: bool = False, budget: float = 570.0,
         runs=RUNS, table_in: str | None = "warm_cache", dynamic: str | None = None, num_images=(1, 2, 3, 4),
         off_bucket=None, steps: int | None = None, shapes: str | None = None, out_dir: str = "bench/results") -> dict:
    """Bake into `workdir` (or use the baked folder `baked`, or the tiny model), then the fresh-process runs."""
    from app.families import FAMILIES
    from bench.latency import versions

    deadline = time.time() + budget
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    family = FAMILIES["flux"].tiny_variant() if tiny else FAMILIES["flux"]
    if shapes:
        from dataclasses import replace

        from app.config import parse_shapes

        family = replace(family, shapes=tuple(parse_shapes(shapes)))
    res = {"versions": versions(),
           "model": "tiny-flux (CPU plumbing)" if tiny else "FLUX.1-dev shape, random weights, baked FP8 on local disk",
           "job": f"{family.defaults.width}x{family.defaults.height}, {steps or family.defaults.steps} steps",
           "shapes": [f"{w}x{h}" for w, h in family.shapes], "dynamic": dynamic or "the worker's default",
           "budget_s": budget}
    if tiny:
        model = "tiny-flux"
    else:
        if baked is None:
            baked = work / "baked"
            res["bake_s"] = bake_random_flux(baked)
        model = str(baked)
    _write(res, out_dir)
    cache = work / "compile-cache"
    for name in runs:
        left = deadline - time.time()
        if left < MARGIN_S * 2:
            res.setdefault("skipped", []).append(name)
            continue
        if name == "cold_disk":  # the baked files evicted from the page cache: a new machine's disk
            from weights.pagecache import drop_cache

            res["cold_disk_method"] = "tiny model: built in code, no files" if tiny else drop_cache(Path(baked))
        table = None
        if name == table_in:
            table = {"rows": table_rows(family, num_images, off_bucket), "deadline": deadline - MARGIN_S,
                     "steps": steps}
        res[name] = run_child(model, cache, work / "out", left - 5, dynamic, table, shapes)
        res[f"{name}_cache_files"] = sorted(p.name for p in cache.glob("*")) if cache.exists() else []
        _write(res, out_dir)
    print(format_table(res), flush=True)
    return res


def format_table(res: dict) -> str:
    """The first-jobs table as Markdown: per row the first and the warmed run, ms per phase."""
    lines = []
    for name in RUNS:
        table = (res.get(name) or {}).get("first_jobs")
        if not table:
            continue
        lines += [f"first jobs after warm-up ({name}, DYNAMIC {res.get('dynamic')}):",
                  "| size | images | rule | first ms (inference) | warm ms (inference) | first/warm | graphs compiled |",
                  "|---|---|---|---|---|---|---|"]
        for r in table["rows"]:
            f, w = ((r.get(k) or {}).get("timings") or {} for k in ("first", "warm"))
            lines.append(f"| {r['size']} | {r['num_images']} | {r['rule']} | {f.get('total_ms')} ({f.get('inference_ms')})"
                         f" | {w.get('total_ms')} ({w.get('inference_ms')}) | {r.get('first_over_warm')} |"
                         f" {(r.get('first') or {}).get('graphs_compiled')} |")
        if table["skipped"]:
            lines.append(f"skipped (--budget): {', '.join(table['skipped'])}")
    return "\n".join(lines)


def _write(res: dict, out_dir: str = "bench/results") -> None:
    from bench.output import save_json

    save_json(res, "coldstart", out_dir)
