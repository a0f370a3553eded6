"""`python -m bench coldstart` on the CPU: the first-jobs table through Service.run, its rows and budget,
and the command itself with --tiny (one fresh process: the plumbing a GPU run relies on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from app.families import FAMILIES
from bench.coldstart import first_jobs, format_table, main, off_bucket_sizes, table_rows

ROOT = Path(__file__).resolve().parents[1]


def test_rows_cover_every_bucket_and_two_off_bucket_sizes():
    flux = FAMILIES["flux"]
    assert off_bucket_sizes(flux) == [(832, 1216), (1152, 896)]  # the 832x1216 among them
    rows = table_rows(flux)
    sizes = list(dict.fromkeys((w, h) for w, h, _ in rows))
    assert sizes == [(1024, 1024), (832, 1216), (1344, 768), (1152, 896), (768, 1344)]  # alternating
    assert rows[:4] == [(1024, 1024, n) for n in (1, 2, 3, 4)] and len(rows) == 20
    tiny = flux.tiny_variant()
    offs = off_bucket_sizes(tiny)
    assert len(offs) == 2 and all(tiny.min_side <= min(s) and s not in tiny.shapes for s in offs)


def test_first_jobs_table_through_service_run(tiny_flux_service):
    """A row: the first run and the warmed run, each with the result's timings and the graphs compiled,
    and the rule's word for it; a row that would start past the deadline is listed as skipped."""
    # The first row starts at once; two runs of it take far longer than 0.05 s, so the second never fits.
    out = first_jobs(tiny_flux_service, [(272, 256, 2), (288, 256, 1)], time.time() + 0.05, steps=1)
    row = out["rows"][0]
    assert len(out["rows"]) == 1 and out["skipped"] == ["288x256x1"]
    assert (row["size"], row["num_images"], row["rule"]) == ("272x256", 2, "none")
    for run in ("first", "warm"):
        t = row[run]["timings"]
        assert t["total_ms"] >= t["inference_ms"] > 0 and row[run]["graphs_compiled"] == 0
    assert row["first_over_warm"] > 0
    text = format_table({"warm_cache": {"first_jobs": out}, "dynamic": "auto"})
    assert "| 272x256 | 2 | none |" in text and "skipped (--budget): 288x256x1" in text


def test_budget_spent_skips_the_runs(tmp_path):
    res = main(str(tmp_path / "w"), tiny=True, budget=1, out_dir=str(tmp_path / "res"))
    assert res["skipped"] == ["no_cache", "warm_cache", "cold_disk"]
    assert json.loads(next((tmp_path / "res").glob("coldstart_*.json")).read_text())["budget_s"] == 1


def test_tiny_command_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "SHAPES", "DYNAMIC")}
    r = subprocess.run([sys.executable, "-m", "bench", "coldstart", "--tiny", "--workdir", str(tmp_path / "w"),
                        "--runs", "warm_cache", "--num-images", "1", "--off-bucket", "272x256", "--steps", "1",
                        "--dynamic", "all", "--budget", "200", "--out", str(tmp_path / "res")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(next((tmp_path / "res").glob("coldstart_*.json")).read_text())
    run = res["warm_cache"]
    assert run["error"] is None and run["process_to_first_image_s"] > 0 and run["phases_ms"]["warmup_ms"] > 0
    assert run["dynamic_setting"] == "all"  # --dynamic reached the worker
    rows = run["first_jobs"]["rows"]
    assert [(row["size"], row["num_images"]) for row in rows] == [("256x256", 1), ("272x256", 1)]
    assert "| 272x256 | 1 | none |" in r.stdout
