"""`python -m bench.assemble`: time loading a baked FLUX.1-dev-shape pipeline (random weights)
with the non-denoiser components read into host memory then moved (`direct=False`) vs straight
onto the GPU (`direct=True`), each in a fresh process, page cache warm for both (off, on, off)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(root: str, direct: bool) -> None:
    t0 = time.perf_counter()
    import torch

    from app.plan import Plan
    from weights import manifest as mf
    from weights.load import assemble, load_denoiser

    t_import = time.perf_counter() - t0
    cap = torch.cuda.get_device_capability(0)
    plan = Plan("cuda", "fp8", cap, torch.cuda.get_device_name(0))
    man = mf.read(Path(root))
    t1 = time.perf_counter()
    den = load_denoiser(Path(root), man, plan)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    pipe = assemble(Path(root), man, plan, den, direct=direct)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    devices = sorted({str(p.device) for c in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae) for p in c.parameters()})
    print("ASSEMBLE" + json.dumps(dict(direct=direct, import_s=round(t_import, 2), denoiser_s=round(t2 - t1, 2),
                                       components_s=round(t3 - t2, 2), total_s=round(t3 - t1, 2), devices=devices,
                                       peak_vram_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))), flush=True)


def main() -> None:
    from bench.coldstart import bake_random_flux
    from bench.latency import versions

    root = Path("/tmp/assemble/baked")
    res = {"versions": versions(), "bake_s": bake_random_flux(root), "runs": []}
    for direct in (False, True, False, True):
        r = subprocess.run([sys.executable, "-m", "bench.assemble", "child", str(root), str(int(direct))],
                           capture_output=True, text=True, timeout=120)
        line = [l for l in r.stdout.splitlines() if l.startswith("ASSEMBLE")]
        res["runs"].append(json.loads(line[-1][8:]) if line else {"direct": direct, "err": r.stderr[-600:]})
        print(res["runs"][-1], flush=True)
    out = os.environ.get("OUT", "bench/results")
    with open(os.path.join(out, "assemble_h100.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3] == "1")
    else:
        main()
