"""The capped bench's measurements: a Service run and its jobs' peaks, each phase's peak, the FP8 text
encoders' error, a denoiser forward's time and kernels; the memory cap itself, and the 4090 estimate."""

from __future__ import annotations

import gc
import hashlib
import time
from pathlib import Path

GIB = 2**30
PROMPT = "a lighthouse on a cliff at dusk, film photograph"
# The text encoders run FP8 (TEXT_ENCODERS=fp8) only where the denoised latents they lead to stay within
# this relative L2 distance of the bf16 encoders' (the FP8 denoiser's own distance is of this order).
TEXT_FP8_BOUND = 0.05


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release():
    """Give the caching allocator's free blocks back and restart the peak: what the next figure sees free
    is what the pipelines still alive hold, nothing more."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gib(n: float) -> float:
    return round(n / GIB, 2)


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return round(((a - b).norm() / b.norm().clamp(min=1e-12)).item(), 5)


def error_record(e: Exception) -> dict:
    return {"error": f"{type(e).__name__}: {str(e)[:400]}"}


def cap_memory(cap_gib: float) -> dict:
    """Leave `cap_gib` usable: the per-process fraction (preflight reads it back), or, on a torch without
    the getter preflight needs, a ballast tensor holding the rest of the free memory."""
    import torch

    from preflight.gpu import usable_bytes

    free, total = torch.cuda.mem_get_info(0)
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        torch.cuda.set_per_process_memory_fraction((cap_gib * GIB + torch.cuda.memory_reserved(0)) / total, 0)
        return {"method": "set_per_process_memory_fraction", "usable_gib": gib(usable_bytes(torch, free, total)),
                "reserved_before_gib": gib(torch.cuda.memory_reserved(0))}
    ballast = torch.empty(max(0, int(free - cap_gib * GIB)), dtype=torch.uint8, device="cuda")
    return {"method": "ballast", "ballast": ballast, "ballast_gib": gib(ballast.numel()),
            "usable_gib": gib(torch.cuda.mem_get_info(0)[0])}


def uncap() -> None:
    """The whole card usable again, and the cap's ballast (already dropped by the caller) given back."""
    import torch

    release()
    if torch.cuda.is_available() and hasattr(torch.cuda, "set_per_process_memory_fraction"):
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


def run_service(source, make, settings, jobs: list[dict], ballast_gib: float = 0.0, measured: int = -1):
    """Service.load with `make()` as its loader (after preflight, as a worker reads its weights: what
    preflight sees free is the card's), the pipeline placed by the plan; then the jobs, `jobs[measured]`
    the measured one."""
    import torch

    from app.memory import load_device
    from app.service import Service
    from app.storage import LocalStore

    def loader(src, plan, cache_dir):
        pipe = make()
        pipe.set_progress_bar_config(disable=True)
        release()  # the build's scratch blocks
        return pipe.to(load_device(plan))

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    service = Service.load(settings, LocalStore(settings.output_uri), source=source, loader=loader)
    out = {"load_s": round(time.perf_counter() - t0, 1), "plan": service.plan.to_dict(), "jobs": []}
    if cuda:
        out["resident_GiB"] = gib(torch.cuda.memory_allocated() - ballast_gib * GIB)
    for i, job in enumerate(jobs):
        release()
        sync()
        t = time.perf_counter()
        res = service.run(job, f"capped-{i}")
        sync()
        rec = {"steps": job["num_inference_steps"], "guidance": job.get("guidance_scale"),
               "wall_s": round(time.perf_counter() - t, 3), "ok": "images" in res}
        rec.update(res.get("timings", {}) if rec["ok"] else {"error": res.get("error")})
        if rec["ok"]:  # the image's bytes: an offloaded plan runs the same kernels on the same weights
            image = Path(settings.output_uri, res["images"][0]["key"]).read_bytes()
            rec["sha256"] = hashlib.sha256(image).hexdigest()[:16]
        if cuda:
            rec["peak_GiB"] = round(torch.cuda.max_memory_allocated() / GIB - ballast_gib, 2)
            rec["allocated_GiB"] = round(torch.cuda.memory_allocated() / GIB - ballast_gib, 2)
        if res.get("cold_start"):
            out["cold_start"] = res["cold_start"]
        out["jobs"].append(rec)
    out["measured"] = out["jobs"][measured]
    return out, service


def job_phases(service, job: dict) -> dict:
    """One more job, each phase's peak GiB above what was allocated when it began: prompt encoding,
    each denoiser forward (the largest), the VAE's encode (a reference image) and decode."""
    import torch

    if not torch.cuda.is_available():
        return {}
    pipe, family = service.pipe, service.family
    rec: dict[str, float] = {}
    base: dict[str, int] = {}

    def enter(name):
        sync()
        base[name] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def leave(name):
        sync()
        rec[name] = max(rec.get(name, 0.0), gib(torch.cuda.max_memory_allocated() - base[name]))

    def wrap(owner, attr, name):
        fn = getattr(owner, attr)

        def wrapped(*a, **k):
            enter(name)
            try:
                return fn(*a, **k)
            finally:
                leave(name)
        setattr(owner, attr, wrapped)
        return lambda: owner.__dict__.pop(attr, None)

    undo = [wrap(pipe, "encode_prompt", "encode_prompt_GiB"), wrap(pipe.vae, "decode", "vae_decode_GiB"),
            wrap(pipe.vae, "encode", "vae_encode_GiB")]
    den = getattr(pipe, family.denoiser)
    hooks = [den.register_forward_pre_hook(lambda m, a: enter("denoiser_forward_GiB")),
             den.register_forward_hook(lambda m, a, o: leave("denoiser_forward_GiB"))]
    release()
    resident = torch.cuda.memory_allocated()
    try:
        res = service.run(job, "phases")
    except Exception as e:  # a figure less, not a section lost
        return error_record(e)
    finally:
        for u in undo:
            u()
        for h in hooks:
            h.remove()
    return {"resident_GiB": gib(resident), **rec, "ok": "images" in res}


def phase_peaks(service, size: int, steps: int) -> dict:
    """FLUX: peak GiB above what is resident of each phase alone: encode, denoise, decode, tiled decode."""
    import torch

    if not torch.cuda.is_available():
        return {}
    pipe, family = service.pipe, service.family
    out = {"resident_GiB": gib(torch.cuda.memory_allocated())}

    def peak(name, fn):
        release()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            r = fn()
        sync()
        out[f"{name}_GiB"] = gib(torch.cuda.max_memory_allocated() - base)
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


def text_fp8(service, job: dict, size: int, steps: int) -> dict:
    """FLUX's text encoders swapped to FP8 in place (weights.quantize.quantize_text_encoder, what
    TEXT_ENCODERS=fp8 loads): their output error and that of the denoised latents they lead to (same seed),
    then the resident plan's job peak with them, with a whole and a tiled decode."""
    import torch

    from app import memory
    from weights.quantize import quantize_text_encoder

    pipe, family = service.pipe, service.family
    dev = getattr(pipe, family.denoiser).device

    def encode_and_denoise():
        with torch.inference_mode():
            emb = family.encode(pipe, PROMPT)
            lat = pipe(**emb, height=size, width=size, num_inference_steps=steps, output_type="latent",
                       guidance_scale=family.defaults.guidance,
                       generator=torch.Generator(dev.type).manual_seed(0)).images
        return emb, lat

    emb16, lat16 = encode_and_denoise()
    swapped = {n: len(quantize_text_encoder(m, "fp8")) for n, m in memory.text_encoders(pipe).items()}
    release()
    emb8, lat8 = encode_and_denoise()
    out = {"swapped_linears": swapped, "rel_err": {k: rel(emb8[k], emb16[k]) for k in emb16},
           "latents_rel_err": rel(lat8, lat16), "bound": TEXT_FP8_BOUND}
    out["within_bound"] = out["latents_rel_err"] <= TEXT_FP8_BOUND
    del emb16, lat16, emb8, lat8
    if not torch.cuda.is_available():
        return out
    release()
    out["resident_GiB"] = gib(torch.cuda.memory_allocated())
    vae = pipe.vae
    for name, tiled in (("job", False), ("job_tiled_512", True)):
        if tiled:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = memory.TILE_PX, memory.TILE_PX // pipe.vae_scale_factor
        release()
        t = time.perf_counter()
        res = service.run(job, f"text-fp8-{name}")
        sync()
        out[name] = {"ok": "images" in res, "wall_s": round(time.perf_counter() - t, 3),
                     "peak_GiB": gib(torch.cuda.max_memory_allocated())}
    vae.disable_tiling()
    return out


def estimate_4090(uncapped_s: float, plan: str, table: dict, forwards: int) -> dict:
    """The RTX 4090 time the uncapped H200 time suggests (bench.cost's ratios) under the capped plan: an
    estimate."""
    from bench.cost import CARDS, COMPUTE_SHARE, offload_s

    h200, rtx = (next(c for c in CARDS if c.name == n) for n in ("H200", "RTX 4090"))
    scale = COMPUTE_SHARE * h200.tensor_tflops["fp8"] / rtx.tensor_tflops["fp8"] + \
        (1 - COMPUTE_SHARE) * h200.bandwidth_gbs / rtx.bandwidth_gbs
    copies = offload_s(plan, table, forwards, rtx)
    return {"seconds": round(uncapped_s * scale + copies, 2), "is": "estimate", "scale": round(scale, 2),
            "copies_s": round(copies, 2), "plan": plan,
            "method": "bench/cost.py: uncapped H200 time x (0.8 x FP8 dense TFLOPS ratio + 0.2 x bandwidth ratio), "
                      "plus the plan's host->device copies at 80% of PCIe Gen4 x16 (not overlapped)"}


def forward_s(t, kw, reps: int) -> float:
    import statistics

    import torch

    with torch.inference_mode():
        for _ in range(2):
            t(**kw)
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            t(**kw)
            sync()
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4)


def gemm_kernels(t, kw) -> list[str]:
    """The GPU kernels of one forward whose names say a low-precision GEMM ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        t(**kw)
        sync()
    names = {e.key for e in prof.key_averages()}
    marks = ("int8", "s8", "i8", "int_mm", "imma", "_int")
    return sorted(n for n in names if any(m in n.lower() for m in marks))[:12]


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
