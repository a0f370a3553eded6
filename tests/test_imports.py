"""Imports: the worker's modules pull in only what they use (a fresh interpreter's sys.modules).

Importing the worker (everything Service.load and the entrypoints import before a model is named) must
not import diffusers, transformers or anything heavy and unused: scikit-learn, peft (a LoRA's library),
torchao, scipy, pandas, matplotlib, Dynamo/Inductor. diffusers itself is imported lazily when the
pipeline is built, and then only the family's own pipeline module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ("app.service", "app.config", "app.logs", "app.jobs", "app.optimize", "app.compile_cache", "app.memory",
          "app.loading", "app.checks", "app.outputs", "app.inputs", "app.storage", "app.fetch", "app.families",
          "app.source", "preflight", "weights.load", "weights.reader", "weights.pagecache")
HEAVY = ("sklearn", "peft", "torchao", "scipy", "pandas", "matplotlib", "diffusers", "transformers", "accelerate",
         "torch._dynamo", "torch._inductor", "triton", "boto3", "av", "runpod", "modal")


def test_the_worker_imports_nothing_heavy_and_diffusers_pipelines_lazily():
    """One fresh interpreter: sys.modules after the worker's modules, then after what `load_pipeline` does
    to build a family's pipeline class (only that pipeline's package may load, and nothing heavy with it)."""
    code = "\n".join(f"import {m}" for m in WORKER) + (
        "\nimport sys, json\nprint('MODS' + json.dumps(sorted(sys.modules)))"
        "\nimport diffusers\nfrom app.families import FAMILIES\ngetattr(diffusers, FAMILIES['flux'].pipeline_class)"
        "\nprint('MODS' + json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    worker, loaded = (set(json.loads(l[4:])) for l in out.stdout.splitlines() if l.startswith("MODS"))
    assert set(WORKER) <= worker
    assert sorted(m for m in HEAVY if m in worker) == []
    packages = {m.split(".")[2] for m in loaded if m.startswith("diffusers.pipelines.") and m.count(".") >= 2}
    assert "flux" in packages and packages <= {"flux", "pipeline_utils", "pipeline_loading_utils"}, packages
    # diffusers and transformers import peft and torchao themselves when installed (docs/speed.md); never these:
    assert sorted(m for m in ("sklearn", "scipy", "pandas", "matplotlib") if m in loaded) == []
