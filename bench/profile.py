"""Where one optimized denoising step spends its GPU time: attention, GEMMs, the rest."""

from __future__ import annotations

import torch

CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "fa3")),
    ("fp8_gemm", ("f8", "fp8", "e4m3", "scaled_mm", "rowwise")),
    ("gemm", ("gemm", "cutlass", "xmma", "sm90", "cublas", "matmul")),
    ("fused_elementwise", ("triton",)),
)


def category(kernel: str) -> str:
    k = kernel.lower()
    for name, keys in CATEGORIES:
        if any(s in k for s in keys):
            return name
    return "other"


def profile_step(pipe, steps: int = 2) -> dict:
    """GPU ms per category over `steps` FLUX denoising steps at 1024x1024, per step."""
    from torch.profiler import ProfilerActivity, profile

    from bench.timing import PROMPT, timed

    with torch.inference_mode():
        pe, ppe, _ = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, max_sequence_length=512)
        kw = dict(prompt_embeds=pe, pooled_prompt_embeds=ppe, height=1024, width=1024, num_inference_steps=steps,
                  guidance_scale=3.5, output_type="latent")
        wall, _ = timed(lambda: pipe(**kw))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            pipe(**kw)
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us <= 0 or ev.key.startswith(("cudaLaunch", "Memcpy", "Memset")) or "::" in ev.key and us == 0:
            continue
        cat = category(ev.key)
        totals[cat] = totals.get(cat, 0.0) + us / 1000 / steps
        top.append((us / 1000 / steps, ev.key[:90], cat))
    top.sort(reverse=True)
    return {"wall_ms_per_step": round(wall * 1000 / steps, 1),
            "gpu_ms_per_step": {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "top_kernels": [dict(ms=round(ms, 2), name=n, cat=c) for ms, n, c in top[:15]]}
