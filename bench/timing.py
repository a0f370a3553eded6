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


def _encode(pipe, family_name: str):
    if family_name == "flux":
        pe, ppe, _ = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, max_sequence_length=512)
        return dict(prompt_embeds=pe, pooled_prompt_embeds=ppe)
    pe, npe, ppe, nppe = pipe.encode_prompt(prompt=PROMPT, do_classifier_free_guidance=True)
    return dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                negative_pooled_prompt_embeds=nppe)


def _decode(pipe, family_name: str, latents, size: int):
    if family_name == "flux":
        lat = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    else:
        lat = latents / pipe.vae.config.scaling_factor
    return pipe.vae.decode(lat, return_dict=False)[0]


def measure(pipe, family_name: str, steps: int, guidance: float, size: int = 1024, reps: int = 3) -> dict:
    """End to end, per step, text encode, VAE decode (medians of `reps`) and peak VRAM of a job."""
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=guidance)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    e2e, enc, den, dec = [], [], [], []
    with torch.inference_mode():
        for _ in range(reps):
            s, _ = timed(lambda: pipe(PROMPT, **kw))
            e2e.append(s)
        for _ in range(reps):
            s, emb = timed(lambda: _encode(pipe, family_name))
            enc.append(s)
            s, lat = timed(lambda: pipe(**emb, output_type="latent", **kw).images)
            den.append(s)
            s, img = timed(lambda: _decode(pipe, family_name, lat, size))
            dec.append(s)
    return dict(e2e_s=med(e2e), e2e_all=[round(x, 3) for x in e2e], denoise_s=med(den),
                per_step_ms=round(1000 * med(den) / steps, 1), encode_s=med(enc), vae_decode_s=med(dec),
                peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                resident_GiB=round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None, finite=bool(torch.isfinite(img).all()))


def warm(pipe, family_name: str, guidance: float, size: int = 1024) -> float:
    """Seconds of the first 2-step call (compilation, autotuning, CUDA graph capture happen here)."""
    with torch.inference_mode():
        s, _ = timed(lambda: pipe(PROMPT, height=size, width=size, num_inference_steps=2, guidance_scale=guidance))
    return round(s, 2)


def graph_vs_plain(pipe, family_name: str, emb: dict, kw: dict) -> float:
    """Relative difference of the final latents, replayed CUDA graphs vs the same denoiser run plainly
    (same seed): replay must change nothing but the launch overhead."""
    from app.families import FAMILIES

    den = getattr(pipe, FAMILIES[family_name].denoiser)
    outs = []
    with torch.inference_mode():
        for enabled in (True, False):
            den.enabled = enabled
            g = torch.Generator(pipe.device.type).manual_seed(0)
            outs.append(pipe(**emb, **kw, generator=g).images.float())
    den.enabled = True
    return round(((outs[0] - outs[1]).norm() / outs[1].norm()).item(), 6)
