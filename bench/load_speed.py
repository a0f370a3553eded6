"""`python -m bench.load_speed`: the baked FP8 FLUX.1-dev-shape denoiser (random weights) from disk or
S3 into GPU memory, each reader in a fresh process, side by side in one run.

Readers (every one ends with all denoiser tensors on the GPU, synchronized):
  reader        weights.reader (what the worker uses): parallel preads, pinned staging, async copies
  load          the worker's whole denoiser load: meta skeleton + weights.reader + load_state_dict
  safetensors   safetensors.safe_open(device="cuda"), a tensor at a time (the reader it replaced)
  runai         run-ai's runai-model-streamer (SafetensorsStreamer to host, then .to("cuda"))
  stream        WEIGHTS_URI path: ranged GETs, sha256 per chunk, pinned buffers, H2D (weights.stream)
  s3_raw        the same ranged GETs with nothing done to the bytes: the client's ceiling here
  runai_s3      runai-model-streamer reading the same objects through its S3 backend
Page cache warm (files just written) and cold (drop_caches before the run). S3 readers talk to
bench.s3_static on loopback. Writes load_speed_<gpu>.json (bench/results and $OUT).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

LOCAL = ("reader", "safetensors", "runai", "load")
S3 = ("stream", "s3_raw", "runai_s3")


def _shards(root: Path) -> list[Path]:
    return sorted((root / "transformer").glob("*.safetensors"))


def _to_gpu_runai(paths: list[str]) -> int:
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(paths, device="cpu")
        for name, t in streamer.get_tensors():
            out[name] = t.to("cuda")
    return len(out)


def _safetensors(paths: list[Path], device: str) -> dict:
    from safetensors import safe_open

    out = {}
    for p in paths:
        with safe_open(str(p), framework="pt", device=device) as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _s3_raw(root: Path, names: list[str]) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from app.storage import s3_client
    from weights.stream import WORKERS

    client, chunk = s3_client(max_pool_connections=WORKERS), 64 << 20

    def get(item):
        name, lo, hi = item
        body = client.get_object(Bucket="bench", Key=f"baked/{name}", Range=f"bytes={lo}-{hi - 1}")["Body"]
        return len(body.read())

    sizes = {n: (root / n).stat().st_size for n in names}
    items = [(n, lo, min(lo + chunk, size)) for n, size in sizes.items() for lo in range(0, size, chunk)]
    with ThreadPoolExecutor(WORKERS) as pool:
        return sum(pool.map(get, items))


def _target(device: str):
    import torch

    from weights.load import Target

    if device == "cpu":  # the plumbing test
        return Target("cpu", torch.float32)
    return Target("cuda:0", torch.bfloat16, torch.cuda.get_device_capability(0), "fp8")


def _reader(root: Path, paths: list[Path], rel: list[str], extra: dict, device: str):
    from weights.reader import read_shards

    n, kept = 0, {}
    for i, (_, tensors, _) in enumerate(read_shards(paths, device)):
        n += len(tensors)
        if i in (0, len(paths) - 1):  # kept for the byte check; the rest is freed as it comes
            kept.update(tensors)
    return n, kept


def _load(root: Path, paths: list[Path], rel: list[str], extra: dict, device: str):
    from weights import manifest as mf
    from weights.load import load_denoiser

    model, times = load_denoiser(root, mf.read(root), _target(device))
    extra.update(skeleton_s=times.skeleton_s, tensors_s=times.tensors_s)
    state = model.state_dict()
    return len(state), state


def _stream(root: Path, paths: list[Path], rel: list[str], extra: dict, device: str):
    from concurrent.futures import ThreadPoolExecutor

    from app.storage import s3_client
    from weights import manifest as mf
    from weights.load import load_denoiser
    from weights.stream import WORKERS, Fetcher, stream_shards

    manifest, target = mf.read(root), _target(device)
    with ThreadPoolExecutor(WORKERS) as pool:
        fetcher = Fetcher(s3_client(max_pool_connections=WORKERS), "bench", "baked", manifest, pool)
        fetcher.check_sizes()
        model, times = load_denoiser(root, manifest, target, stream_shards(fetcher, rel, target.device))
        extra.update(skeleton_s=times.skeleton_s, tensors_s=times.tensors_s)
    state = model.state_dict()
    return len(state), state


READERS = {
    "reader": _reader, "load": _load, "stream": _stream,
    "safetensors": lambda root, paths, rel, extra, device: (len(_safetensors(paths, device)), None),  # the reference
    "runai": lambda root, paths, rel, extra, device: (_to_gpu_runai([str(p) for p in paths]), None),
    "runai_s3": lambda root, paths, rel, extra, device: (_to_gpu_runai([f"s3://bench/baked/{r}" for r in rel]), None),
    "s3_raw": lambda root, paths, rel, extra, device: (_s3_raw(root, rel), None),
}


def _same_bytes(got: dict, paths: list[Path]) -> bool:
    """Whether the first and last shards' tensors in `got` equal what safetensors reads (on the CPU),
    byte for byte once in the file's dtype (a CPU plan holds bf16 tensors as their exact fp32 values)."""
    import torch
    from safetensors import safe_open

    raw = lambda t: t.detach().cpu().reshape(-1).view(torch.uint8)  # noqa: E731
    for p in dict.fromkeys([paths[0], paths[-1]]):
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                ref = f.get_tensor(k)
                if k not in got or not raw(got[k].to(ref.dtype)).equal(raw(ref)):
                    return False
    return True


def child(method: str, root: str, device: str = "cuda") -> dict:
    """One reader in this fresh process; prints LOAD{json} and returns it (`device="cpu"`: the
    plumbing test, where the clocks mean nothing)."""
    import torch

    cuda = device == "cuda"
    if cuda:
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the CUDA context is not the reader's cost
    root_p = Path(root)
    paths = _shards(root_p)
    nbytes = sum(p.stat().st_size for p in paths)
    rel = [str(p.relative_to(root_p)) for p in paths]
    extra: dict = {}
    if method in ("load", "stream"):  # diffusers' import is the worker's import phase, not the load's
        t0 = time.perf_counter()
        from diffusers import FluxTransformer2DModel  # noqa: F401

        extra["import_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    n, got = READERS[method](root_p, paths, rel, extra, device)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    if got is not None:  # outside the timing: the GPU path's bytes against safetensors' own reading
        extra["bytes_equal_safetensors"] = _same_bytes(got, paths)
    res = dict(method=method, seconds=round(secs, 2), gbytes=round(nbytes / 1e9, 2),
               gb_per_s=round(nbytes / 1e9 / secs, 2), tensors=n,
               peak_vram_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None, **extra)
    print("LOAD" + json.dumps(res), flush=True)
    return res


def run_child(method: str, root: Path, cold: bool, env: dict) -> dict:
    if cold:
        from weights.pagecache import drop_cache

        drop_cache(root)
    r = subprocess.run([sys.executable, "-m", "bench.load_speed", "child", method, str(root)], env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stdout.splitlines() if line.startswith("LOAD")]
    res = json.loads(lines[-1][4:]) if lines else {"method": method, "rc": r.returncode,
                                                   "stderr": r.stderr[:1500] + " ... " + r.stderr[-800:]}
    res["page_cache"] = "cold" if cold else "warm"
    print(res, flush=True)
    return res


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    import argparse

    from bench.coldstart import bake_random_flux
    from bench.latency import versions
    from bench.output import save_json

    ap = argparse.ArgumentParser(prog="python -m bench.load_speed")
    ap.add_argument("--workdir", default="/tmp/load_speed")
    ap.add_argument("--baked", default=None, help="an existing baked folder (else one is baked first)")
    ap.add_argument("--warm", default=",".join(LOCAL), help="local readers, page cache warm")
    ap.add_argument("--cold", default="reader,safetensors,runai", help="local readers, page cache dropped")
    ap.add_argument("--s3", default=",".join(S3), help="readers from the loopback S3 endpoint")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    pick = lambda text: [m for m in text.split(",") if m]  # noqa: E731
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    root = Path(args.baked) if args.baked else work / "baked"
    res = {"versions": versions(), "model": "FLUX.1-dev-shape transformer, baked FP8, random weights", "runs": []}
    if not args.baked:
        res["bake_s"] = bake_random_flux(root)
    env = dict(os.environ)
    for _ in range(args.rounds):
        res["runs"] += [run_child(m, root, False, env) for m in pick(args.warm)]
        save_json(res, "load_speed")
    res["runs"] += [run_child(m, root, True, env) for m in pick(args.cold)]
    if pick(args.s3):
        _s3_runs(root, res, env, pick(args.s3))
    save_json(res, "load_speed")
    return res


def _s3_runs(root: Path, res: dict, env: dict, methods: list[str]) -> None:
    port = _port()
    server = subprocess.Popen([sys.executable, "-m", "bench.s3_static", str(root.parent), str(port)])
    try:
        time.sleep(1.0)
        env = dict(env, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                   AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
                   AWS_EC2_METADATA_DISABLED="true", RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
                   RUNAI_STREAMER_LOG_TO_STDERR="1")
        res["s3_endpoint"] = "bench.s3_static on 127.0.0.1 (sendfile, path-style), files in the page cache"
        res["runs"] += [run_child(m, root, False, env) for m in methods]
    finally:
        server.terminate()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
