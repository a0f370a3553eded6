"""The optimization recipe and warm-up (GPU paths are filled in by the speed work; CPU runs plain)."""

from __future__ import annotations

import time

import torch
from loguru import logger


def apply_recipe(pipe, family, plan, settings) -> list[str]:
    """Apply the recipe for `plan` to `pipe` in place; return the names of the steps applied."""
    return []


def warmup(pipe, family, defaults, shapes) -> dict:
    """Run every shape bucket once (2 steps) so encoders and compiled graphs are ready; ms per shape."""
    out = {}
    for w, h in shapes:
        t0 = time.perf_counter()
        kw = dict(prompt="warm up", width=w, height=h, num_inference_steps=2, guidance_scale=defaults.guidance,
                  output_type="pil")
        if defaults.max_sequence_length:
            kw["max_sequence_length"] = defaults.max_sequence_length
        with torch.inference_mode():
            pipe(**kw)
        out[f"{w}x{h}"] = round((time.perf_counter() - t0) * 1000, 1)
    logger.info("warm-up: {}", out)
    return out
