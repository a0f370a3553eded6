"""Timing helpers shared by the benchmarks: CUDA-synchronized wall clocks, medians, phases.

On a machine without CUDA (the tiny CPU test of the plumbing) the clocks are plain wall clocks and
the memory figures are None; on a GPU nothing differs from what the H100 results measured.
"""

from __future__ import annotations

import statistics
import time

import torch

PROMPT = "a cat holding a sign that says hello world"


def sync() -> None:
    """Wait for queued GPU work (CUDA kernels run asynchronously); nothing to wait for without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(seconds, result) of fn() with the GPU synchronized on both sides."""
    sync()
    t0 = time.perf_counter()
    r = fn()
    sync()
    return time.perf_counter() - t0, r


def med(xs) -> float:
    return round(statistics.median(xs), 4)


def measure(pipe, family, steps: int, size: int = 1024, reps: int = 3) -> dict:
    """End to end, per step, text encode, VAE decode (medians of `reps`) and peak VRAM of a job."""
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=family.defaults.guidance)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    e2e, enc, den, dec = [], [], [], []
    with torch.inference_mode():
        for _ in range(reps):
            s, _ = timed(lambda: pipe(PROMPT, **kw))
            e2e.append(s)
        for _ in range(reps):
            s, emb = timed(lambda: family.encode(pipe, PROMPT))
            enc.append(s)
            s, lat = timed(lambda: pipe(**emb, output_type="latent", **kw).images)
            den.append(s)
            s, img = timed(lambda: family.decode(pipe, lat, size, size))
            dec.append(s)
    return dict(e2e_s=med(e2e), e2e_all=[round(x, 3) for x in e2e], denoise_s=med(den),
                per_step_ms=round(1000 * med(den) / steps, 1), encode_s=med(enc), vae_decode_s=med(dec),
                peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                resident_GiB=round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None, finite=bool(torch.isfinite(img).all()))


def warm(pipe, family, size: int = 1024) -> float:
    """Seconds of the first 2-step call (compilation, autotuning, CUDA graph capture happen here)."""
    with torch.inference_mode():
        s, _ = timed(lambda: pipe(PROMPT, height=size, width=size, num_inference_steps=2,
                                  guidance_scale=family.defaults.guidance))
    return round(s, 2)


def graph_vs_plain(pipe, family, emb: dict, kw: dict) -> float:
    """Relative difference of the final latents, replayed CUDA graphs vs the same denoiser run plainly
    (same seed): replay must change nothing but the launch overhead."""
    graphed = getattr(pipe, family.denoiser)
    outs = []
    with torch.inference_mode():
        for den in (graphed, graphed.module):  # app.cudagraphs.GraphedDenoiser wraps the plain module
            setattr(pipe, family.denoiser, den)
            g = torch.Generator(pipe.device.type).manual_seed(0)
            outs.append(pipe(**emb, **kw, generator=g).images.float())
    setattr(pipe, family.denoiser, graphed)
    return round(((outs[0] - outs[1]).norm() / outs[1].norm()).item(), 6)
