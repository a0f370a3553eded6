"""Soak on the CPU: 200 sequential tiny jobs through Service.run, the process's memory growth reported.

RSS is measured after a warm-up of 20 jobs (allocator pools, tokenizer caches and lazily built
modules settle there) and again after 200 more; the goal is growth within 5%. The GPU soak (50
full-size FLUX-shape jobs, VRAM flat, a deliberate OOM then a normal job) is `python -m bench.soak`.
"""

from __future__ import annotations

import gc
import time

from app.storage import LocalStore
from bench.soak import rss_bytes
from tests.hardening_helpers import one_torch_thread, service_like, tiny_job  # noqa: F401 (fixture)

WARMUP, JOBS, GOAL_PCT = 20, 200, 5.0


def test_200_jobs_memory_stays_flat(tiny_flux_service, tmp_path, one_torch_thread):
    service = service_like(tiny_flux_service, LocalStore(tmp_path))
    for i in range(WARMUP):
        assert "images" in service.run(tiny_job(i), f"warm-{i}")
    gc.collect()
    start, peak, t0 = rss_bytes(), 0, time.monotonic()
    for i in range(JOBS):
        out = service.run(tiny_job(1000 + i, output_format=("png", "jpeg", "webp")[i % 3]), f"soak-{i:03d}")
        assert "images" in out, out
        peak = max(peak, rss_bytes())
    gc.collect()
    end = rss_bytes()
    growth = (end - start) / start * 100
    print(f"\nsoak: {JOBS} jobs in {time.monotonic() - t0:.1f} s; RSS after {WARMUP}-job warm-up "
          f"{start / 2**20:.1f} MiB, after {JOBS} jobs {end / 2**20:.1f} MiB ({growth:+.2f}%), "
          f"peak {peak / 2**20:.1f} MiB")
    assert len(list(tmp_path.rglob("*.*"))) == WARMUP + JOBS  # every job stored its image
    assert growth < GOAL_PCT
