"""`python -m bench aot_probe`: why `aoti_load_package` crashes on the device, and what torch offers instead.

Builds an AOTInductor package of a one-Linear model, then loads it in fresh processes, each stage on
its own so a crash names the stage: `dlopen` of the package's .so alone (ctypes), torch's runner on the
.so, and `aoti_load_package`. A crashing stage is rerun under `python -X faulthandler` and, where the
image has it, `cuda-gdb` for a native backtrace. Also records which precompile switches this torch has.
Writes `aot_probe_<gpu>.json`.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

STAGES = {
    "import_torch_cuda": "import torch; torch.zeros(1, device='cuda'); print('ok')",
    "dlopen_so": "import torch, ctypes; ctypes.CDLL({so!r}); print('ok')",
    "runner_on_so": ("import torch; r = torch._C._aoti.AOTIModelContainerRunnerCuda({so!r}, 1, 'cuda', {cubin_dir!r});"
                     " print('ok')"),
    "aoti_load_package": ("import torch; m = torch._inductor.aoti_load_package({pkg!r});"
                          " print(m(torch.randn(8, 64, device='cuda')).shape)"),
}


def _build(work: Path) -> dict:
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 64)

        def forward(self, x):
            return torch.relu(self.lin(x))

    m = M().cuda()
    t0 = time.perf_counter()
    ep = torch.export.export(m, (torch.randn(8, 64, device="cuda"),))
    pkg = torch._inductor.aoti_compile_and_package(ep, package_path=str(work / "lin.pt2"))
    out = {"build_s": round(time.perf_counter() - t0, 2), "package": pkg}
    x = work / "x"
    with zipfile.ZipFile(pkg) as z:
        z.extractall(x)
        out["members"] = [n for n in z.namelist()][:40]
    sos = glob.glob(str(x / "**" / "*.so"), recursive=True)
    out["so"] = sos[0] if sos else None
    out["cubin_dir"] = str(Path(sos[0]).parent) if sos else ""
    if sos and shutil.which("ldd"):
        out["ldd"] = subprocess.run(["ldd", sos[0]], capture_output=True, text=True).stdout.splitlines()
    return out


def _run(code: str, timeout: float = 120.0, prefix: list[str] | None = None) -> dict:
    cmd = (prefix or []) + [sys.executable, "-X", "faulthandler", "-c", code]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-6000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)[-2000:]
    return {"rc": rc, "s": round(time.perf_counter() - t0, 2), "tail": tail}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench aot_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    import torch

    from bench.latency import versions
    from bench.output import save_json

    res: dict = {"versions": versions(), "switches": {}}
    for name in ("caching_precompile", "enable_aot_compile", "use_graph_deduplication"):
        res["switches"][f"torch._dynamo.config.{name}"] = getattr(torch._dynamo.config, name, "absent")
    res["switches"]["torch.compiler.save_cache_artifacts"] = hasattr(torch.compiler, "save_cache_artifacts")
    res["switches"]["torch.compiler.load_compiled_function"] = hasattr(torch.compiler, "load_compiled_function")
    res["kernel"] = Path("/proc/version").read_text().strip() if Path("/proc/version").exists() else None
    work = Path(tempfile.mkdtemp(prefix="aot-probe-"))
    try:
        res["build"] = b = _build(work)
    except Exception as e:
        res["build"] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
        save_json(res, "aot_probe", args.out)
        return 1
    fill = {"so": b["so"], "pkg": b["package"], "cubin_dir": b["cubin_dir"]}
    res["stages"] = {}
    for name, code in STAGES.items():
        r = res["stages"][name] = _run(code.format(**fill))
        print(name, r["rc"], flush=True)
        gdb = shutil.which("cuda-gdb")
        first_crash = not any("cuda_gdb" in v for v in res["stages"].values())
        if r["rc"] not in (0, "timeout") and gdb and first_crash:  # one native backtrace: the earliest stage
            r["cuda_gdb"] = _run(code.format(**fill), timeout=100,
                                 prefix=[gdb, "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary",
                                         "--args"])
            r["cuda_gdb"]["tail"] = r["cuda_gdb"]["tail"][-8000:]
    print(json.dumps({k: v["rc"] for k, v in res["stages"].items()}))
    save_json(res, "aot_probe", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
