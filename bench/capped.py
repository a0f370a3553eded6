"""`python -m bench capped`: FLUX.1-dev on a simulated 24 GB card, through the worker's real Service path.

    python -m bench capped            # GPU: FLUX.1-dev shape, random weights, 1024x1024, 28 steps
    python -m bench capped --tiny     # CPU: the tiny FLUX pipeline (plumbing only; offload-text forced)

1. Uncapped: `Service.load` (preflight, memory plan, recipe: FP8 + regional compile, warm-up) around a
   full-size random-weight pipeline built on the GPU (bench.models); one warm job, one measured job;
   then the peak of each phase alone (encode, denoise, decode whole and tiled): the figures
   preflight.memory's component table estimates.
2. Capped: a fresh pipeline with the same weights, moved to host memory, then
   `torch.cuda.set_per_process_memory_fraction` leaves `--cap-gib` (23.5: an RTX 4090's free memory)
   usable; preflight sees the cap (preflight.gpu.usable_bytes), picks the plan (auto), and the loader
   hands over the pipeline where the plan wants it (`app.memory.load_device`). Same jobs.

Reported: job seconds, peak GiB, the plan, capped/uncapped (goal: at most 1.15), and an ESTIMATED RTX
4090 time: the capped run's time scaled by bench.cost's ratios (FP8 dense tensor throughput 1979 vs
330.3 TFLOPS, bandwidth 4800 vs 1008 GB/s, 80/20) plus the text encoders' copy at the 4090's PCIe
Gen4 rate (bench.cost's docstring names the sources). It is an estimate, not a 4090 measurement.
Qwen-Image-Edit is not a family of this worker yet: not run here.

Results: capped_<gpu>.json in bench/results (and $OUT). Exit 1 when a run failed.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

GIB = 2**30
PROMPT = "a lighthouse on a cliff at dusk, film photograph"


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cap_memory(cap_gib: float) -> dict:
    """Leave `cap_gib` usable: the per-process fraction (preflight reads it back), or, on a torch without
    the getter preflight needs, a ballast tensor holding the rest of the free memory."""
    import torch

    from preflight.gpu import usable_bytes

    free, total = torch.cuda.mem_get_info(0)
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        torch.cuda.set_per_process_memory_fraction((cap_gib * GIB + torch.cuda.memory_reserved(0)) / total, 0)
        return {"method": "set_per_process_memory_fraction", "usable_gib": round(usable_bytes(torch, free, total) / GIB, 2)}
    ballast = torch.empty(max(0, int(free - cap_gib * GIB)), dtype=torch.uint8, device="cuda")
    return {"method": "ballast", "ballast": ballast, "ballast_gib": round(ballast.numel() / GIB, 2),
            "usable_gib": round(torch.cuda.mem_get_info(0)[0] / GIB, 2)}


def uncap() -> None:
    import torch

    if torch.cuda.is_available() and hasattr(torch.cuda, "set_per_process_memory_fraction"):
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


def _source_and_build(tiny: bool):
    from app.families import FAMILIES
    from app.source import ModelSource

    flux = FAMILIES["flux"]
    if tiny:
        return ModelSource("tiny", "tiny-flux", flux.tiny_variant()), flux.build_tiny
    from bench.models import build_flux_dev

    return ModelSource("hub", "flux-dev-shape-random", flux), lambda: build_flux_dev("cuda")


def run_service(source, pipe, settings, jobs: list[dict], ballast_gib: float = 0.0) -> tuple[dict, object]:
    """Service.load around `pipe` (placed by the plan), then the jobs; the last one is the measured one."""
    import torch

    from app.memory import load_device
    from app.service import Service
    from app.storage import LocalStore

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    service = Service.load(settings, LocalStore(settings.output_uri), source=source,
                           loader=lambda src, plan, cache_dir: pipe.to(load_device(plan)))
    out = {"load_s": round(time.perf_counter() - t0, 1), "plan": service.plan.to_dict(), "jobs": []}
    for i, job in enumerate(jobs):
        _release()
        _sync()
        t = time.perf_counter()
        res = service.run(job, f"capped-{i}")
        _sync()
        rec = {"wall_s": round(time.perf_counter() - t, 3), "ok": "images" in res}
        rec.update(res.get("timings", {}) if rec["ok"] else {"error": res.get("error")})
        if cuda:
            rec["peak_GiB"] = round(torch.cuda.max_memory_allocated() / GIB - ballast_gib, 2)
            rec["allocated_GiB"] = round(torch.cuda.memory_allocated() / GIB - ballast_gib, 2)
        if res.get("cold_start"):
            out["cold_start"] = res["cold_start"]
        out["jobs"].append(rec)
    out["measured"] = out["jobs"][-1]
    return out, service


def phase_peaks(service, size: int, steps: int) -> dict:
    """Peak GiB above what is resident, of each phase alone: encode, denoise, decode, tiled decode."""
    import torch

    if not torch.cuda.is_available():
        return {}
    pipe, family = service.pipe, service.family
    out = {"resident_GiB": round(torch.cuda.memory_allocated() / GIB, 2)}

    def peak(name, fn):
        _release()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            r = fn()
        _sync()
        out[f"{name}_GiB"] = round((torch.cuda.max_memory_allocated() - base) / GIB, 2)
        return r

    emb = peak("encode", lambda: family.encode(pipe, PROMPT))
    lat = peak("denoise", lambda: pipe(**emb, height=size, width=size, num_inference_steps=steps,
                                       guidance_scale=family.defaults.guidance, output_type="latent").images)
    peak("decode", lambda: family.decode(pipe, lat, size, size))
    vae = pipe.vae
    vae.enable_tiling()
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 512 // pipe.vae_scale_factor
    try:
        peak("decode_tiled_512", lambda: family.decode(pipe, lat, size, size))
    finally:
        vae.disable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    return out


def estimate_4090(capped_s: float, text_gib: float, plan: str) -> dict:
    """The RTX 4090 time the capped H200 time suggests (bench.cost's ratios): an estimate."""
    from bench.cost import CARDS, COMPUTE_SHARE, offload_s

    h200, rtx = (next(c for c in CARDS if c.name == n) for n in ("H200", "RTX 4090"))
    table = {"text_encoders": text_gib, "denoiser": 0.0}
    compute = capped_s - offload_s(plan, table, 0, h200)
    scale = COMPUTE_SHARE * h200.tensor_tflops["fp8"] / rtx.tensor_tflops["fp8"] + \
        (1 - COMPUTE_SHARE) * h200.bandwidth_gbs / rtx.bandwidth_gbs
    return {"seconds": round(compute * scale + offload_s(plan, table, 0, rtx), 2), "is": "estimate",
            "scale": round(scale, 2), "method": "bench/cost.py: FP8 dense TFLOPS and bandwidth ratios 80/20, "
                                                "plus the text encoders' host->device copy at PCIe Gen4"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench capped", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU: the tiny FLUX pipeline")
    ap.add_argument("--cap-gib", type=float, default=23.5)
    ap.add_argument("--size", type=int, default=None, help="default 1024 (tiny: 256)")
    ap.add_argument("--steps", type=int, default=None, help="default 28 (tiny: 2)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    import torch

    from app.config import Settings
    from bench.latency import versions
    from bench.output import save_json

    cuda = torch.cuda.is_available() and not args.tiny
    size = args.size or (1024 if cuda else 256)
    steps = args.steps or (28 if cuda else 2)
    job = {"prompt": PROMPT, "width": size, "height": size, "num_inference_steps": steps, "seed": 0}
    source, build = _source_and_build(not cuda)
    out_dir = tempfile.mkdtemp(prefix="capped-")
    base = dict(output_uri=out_dir, job_timeout_s=3600, shapes=f"{size}x{size}",
                compile="regional" if cuda else "off", device="cuda" if cuda else "cpu")
    res = {"versions": versions(), "size": size, "steps": steps, "cap_gib": args.cap_gib, "weights": "random"}
    failed = False
    try:
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        res["uncapped"], service = run_service(source, pipe, Settings(memory_plan="resident", **base), [job, job])
        res["uncapped"]["phase_peaks"] = phase_peaks(service, size, steps)
        del service, pipe
    except Exception as e:  # keep going: the capped run is the point
        res["uncapped"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        failed = True
        pipe = service = None  # noqa: F841  (their GPU memory must go before the capped run)
    _release()
    torch._dynamo.reset()
    ballast_gib = 0.0
    try:
        pipe = build().to("cpu")  # same seed, same weights; host memory first, as a capped loader does
        pipe.set_progress_bar_config(disable=True)
        _release()
        if cuda:
            cap = cap_memory(args.cap_gib)
            ballast = cap.pop("ballast", None)
            ballast_gib = cap.get("ballast_gib", 0.0)
            res["cap"] = cap
        # on a CPU nothing caps memory: force the plan a 24 GB card gets, so its path runs
        plan = "auto" if cuda else "offload-text"
        res["capped"], service = run_service(source, pipe, Settings(memory_plan=plan, **base), [job, job],
                                             ballast_gib)
        del service, pipe
        if cuda:
            del ballast
    except Exception as e:
        res["capped"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        failed = True
    finally:
        uncap()
    up, cap = res.get("uncapped", {}).get("measured"), res.get("capped", {}).get("measured")
    if up and cap and up.get("ok") and cap.get("ok"):
        res["capped_over_uncapped"] = round(cap["total_ms"] / up["total_ms"], 3)
        res["goal_at_most"] = 1.15
        if cuda:
            from app.families import FAMILIES

            text = FAMILIES["flux"].memory_table()["fp8"]["text_encoders"]
            res["rtx4090_estimate"] = estimate_4090(cap["total_ms"] / 1000, text, res["capped"]["plan"]["memory"])
    else:
        failed = True
    save_json(res, "capped", args.out)
    return 1 if failed else 0
