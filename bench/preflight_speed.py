"""Time `preflight.run` on a GPU, cold: in fresh processes, from just after `import torch` to the report.

    python -m bench.preflight_speed [--runs 3]

Each run is a new Python process (so CUDA context, cuBLAS, cuDNN and torchao are loaded for real);
`import torch` is timed separately because the budget (5 s on an H100) starts after it. The second
`preflight.run` in the same process is reported as `warm_s` for comparison. Configuration is the
worker's own environment (MODEL, OUTPUT_URI, PRECISION, ...): the default tiny model and a local
output folder keep the figure free of network time. Writes bench/results/preflight_<gpu>_<time>.json,
or under $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUDGET_S = 5.0


def child() -> None:
    """One cold measurement; prints one JSON line on stdout."""
    t0 = time.perf_counter()
    import torch  # noqa: F401  (the budget starts after this)

    t1 = time.perf_counter()
    import preflight
    from app.config import Settings

    settings = Settings.from_env()
    report = preflight.run(settings, cpu=False)
    t2 = time.perf_counter()
    warm = preflight.run(settings, cpu=False)
    t3 = time.perf_counter()
    print(json.dumps({"import_torch_s": round(t1 - t0, 3), "cold_s": round(t2 - t1, 3), "warm_s": round(t3 - t2, 3),
                      "report": report.to_dict(), "warm_checks": {c.id: c.ms for c in warm.checks}}))


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "torchao", "diffusers", "transformers", "triton", "nvidia-ml-py"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.preflight_speed")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child()
        return 0
    root = Path(__file__).resolve().parent.parent
    runs = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-m", "bench.preflight_speed", "--child"], cwd=root,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = runs[0]["report"]
    cold = [r["cold_s"] for r in runs]
    result = {
        "what": "preflight.run cold, in a fresh process, from after `import torch` to the report",
        "gpu": first["gpu"].get("name", "none"), "gpu_facts": first["gpu"], "versions": versions(),
        "budget_s": BUDGET_S, "cold_s_median": statistics.median(cold), "cold_s": cold,
        "within_budget": first["ok"] and statistics.median(cold) <= BUDGET_S, "import_torch_s": [r["import_torch_s"] for r in runs],
        "warm_s": [r["warm_s"] for r in runs], "preflight_ok": first["ok"], "plan": first["plan"],
        "checks_ms_cold": [{c["id"]: c["ms"] for c in r["report"]["checks"]} for r in runs],
        "checks_ms_warm": runs[0]["warm_checks"], "report": first,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else root / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in result["gpu"]).strip("-").lower() or "none"
    path = folder / f"preflight_{slug}_{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"{result['gpu']}: preflight cold {result['cold_s_median']:.2f} s (median of {len(cold)}; budget "
          f"{BUDGET_S:g} s), ok={first['ok']}, plan={first['plan']['precision']} -> {path}")
    return 0 if first["ok"] else 1  # a failed preflight's time is not the figure: say so in the exit code


if __name__ == "__main__":
    sys.exit(main())
