"""GPU bench: baked FP8Linear FLUX.1-dev-shape transformer load vs bf16 from_pretrained + quantize.

python -m bench.weights_load [--dir /path/with/40GB]
Writes $OUT/weights_<gpu>.json (else bench/results/). Random weights (load speed does not depend on
their values; fidelity is measured on the same random model). Needs torch, diffusers, safetensors,
loguru (torchao only for its version). Streaming from S3 and fresh-process loads: bench.load_speed.
No network. About 3 minutes on an H100 (disk-bound: 24 GB bf16 + 12 GB FP8 written and read).
Phases, each with wall time, GB/s, peak host RSS and peak VRAM above what was allocated before:
  bake        build on the GPU (bench.models), save a bf16 copy, `quantize_denoiser` (fused QKV +
              FP8Linear per row, our skip list), write the baked denoiser + manifest
  page_cache  load the baked denoiser right after writing it (files in the page cache)
  fidelity    FP8 (GPU path: FP8 activations too) output vs the bf16 output on the same inputs
  cold        the same files evicted from the page cache (drop_caches, else fadvise DONTNEED)
  bf16_quant  diffusers from_pretrained of the bf16 save + `quantize_denoiser` on the GPU (what a
              worker without baked weights does); its tensors are compared with the baked files
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

PLAN = None  # set in main (needs the GPU's capability)


class RSS:
    """Peak resident set size of this process during a block (sampled every 5 ms)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


@contextmanager
def phase(results: dict, name: str, nbytes: int | None = None):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rec: dict = {}
    with RSS() as rss:
        t0 = time.perf_counter()
        yield rec
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    rec.update(seconds=round(secs, 3), peak_rss_gib=round(rss.peak / 2**30, 2),
               peak_vram_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 2))
    if nbytes:
        rec.update(gbytes=round(nbytes / 1e9, 2), gb_per_s=round(nbytes / 1e9 / secs, 2))
    results[name] = rec
    print(name, json.dumps(rec), flush=True)


def inputs(tokens: int = 256, text: int = 64):
    g = torch.Generator("cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g, **bf),
                encoder_hidden_states=torch.randn(1, text, 4096, generator=g, **bf),
                pooled_projections=torch.randn(1, 768, generator=g, **bf), timestep=torch.tensor([0.5], **bf),
                img_ids=torch.zeros(tokens, 3, device="cuda"), txt_ids=torch.zeros(text, 3, device="cuda"),
                guidance=torch.tensor([3.5], **bf))


def drop_cache(root: Path) -> str:
    """Evict `root`'s files from the page cache; return the method that worked."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for p in root.rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        return "posix_fadvise(DONTNEED) per file"


def cpu_bake_equals_gpu(weight: torch.Tensor) -> bool:
    """`quantize_rows` gives the same bytes on the CPU (a build machine without a GPU) as on the GPU."""
    from app.fp8 import quantize_rows

    gw, gs = quantize_rows(weight)
    cw, cs = quantize_rows(weight.cpu())
    return torch.equal(gw.cpu().view(torch.uint8), cw.view(torch.uint8)) and torch.equal(gs.cpu(), cs)


def bake_phase(work: Path, results: dict):
    from app.families import FLUX
    from app.optimize import quantize_denoiser
    from bench.models import build_flux_transformer
    from weights import manifest as mf
    from weights.bake import RECIPES
    from weights.serialize import write_denoiser

    with phase(results, "bake") as rec:
        t = build_flux_transformer()
        with torch.no_grad():
            ref = t(**inputs()).sample.float()
        t0 = time.perf_counter()
        t.save_pretrained(work / "bf16" / "transformer")
        rec["bf16_save_s"] = round(time.perf_counter() - t0, 1)
        rec["cpu_quantize_equals_gpu"] = cpu_bake_equals_gpu(t.transformer_blocks[0].ff.net[2].weight.detach())
        t0 = time.perf_counter()
        quantized = quantize_denoiser(t, FLUX, "fp8")
        rec["quantize_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        write_denoiser(t, work / "baked" / "transformer")
        mf.write(work / "baked", {"source": {"id": "random flux.1-dev shape", "revision": None}, "family": "flux",
                                  "denoiser": "transformer", "vram_gib": FLUX.vram_gib.get("fp8"),
                                  "recipe": {"precision": "fp8", "fused_qkv": True, "config": RECIPES["fp8"],
                                             "skip": list(FLUX.quant_skip), "quantized_layers": len(quantized)}})
        rec.update(write_and_hash_s=round(time.perf_counter() - t0, 1), quantized_layers=len(quantized))
        del t
    return ref


def load_phase(results: dict, name: str, root: Path, ref=None):
    from weights import manifest as mf
    from weights.load import load_denoiser

    manifest = mf.read(root)
    nbytes = sum(i["size"] for n, i in manifest["files"].items() if n.endswith(".safetensors"))
    with phase(results, name, nbytes) as rec:
        model = load_denoiser(root, manifest, PLAN)
    state_gib = sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2**30
    # No bf16 copy, no re-quantization: the load's VRAM peak is the FP8 state itself.
    rec.update(state_gib=round(state_gib, 2), vram_peak_within_state=rec["peak_vram_gib"] <= state_gib * 1.02 + 0.1)
    if ref is not None:
        with torch.no_grad():
            out = model(**inputs()).sample.float()
        results["fidelity"] = {"rel_err_fp8_vs_bf16": round(((out - ref).norm() / ref.norm()).item(), 5),
                               "image_tokens": 256, "text_tokens": 64,
                               "path": "FP8Linear on CUDA: FP8 weights and per-row FP8 activations, eager"}
        print("fidelity", results["fidelity"], flush=True)
    del model


def bf16_quant_phase(work: Path, results: dict):
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    from app.families import FLUX
    from app.optimize import quantize_denoiser

    nbytes = sum(p.stat().st_size for p in (work / "bf16" / "transformer").glob("*.safetensors"))
    with phase(results, "bf16_quant", nbytes) as rec:
        t0 = time.perf_counter()
        t = FluxTransformer2DModel.from_pretrained(work / "bf16" / "transformer", torch_dtype=torch.bfloat16).to("cuda")
        torch.cuda.synchronize()
        rec["from_pretrained_s"] = round(time.perf_counter() - t0, 2)
        rec["bf16_page_cache"] = "as left by the bake (not dropped): the usual recipe's best case"
        quantize_denoiser(t, FLUX, "fp8")
    state, same = t.state_dict(), True
    for shard in sorted((work / "baked" / "transformer").glob("*.safetensors")):
        with safe_open(str(shard), framework="pt", device="cuda") as f:
            for k in f.keys():
                same = same and torch.equal(f.get_tensor(k).view(torch.uint8), state[k].view(torch.uint8))
    rec["baked_bytes_equal_runtime_quantize"] = same
    del t, state


def save(results: dict) -> None:
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"weights_{results['gpu'].replace(' ', '_')}.json").write_text(json.dumps(results, indent=1))


def main():
    global PLAN
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/weights-bench")
    args = ap.parse_args()
    from app.plan import Plan

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gpu = torch.cuda.get_device_name(0)
    PLAN = Plan("cuda", "fp8", torch.cuda.get_device_capability(0), gpu)
    versions = {}
    for name in ("torch", "diffusers", "safetensors", "torchao", "moto", "boto3"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    results = {"gpu": gpu, "capability": list(PLAN.capability), "versions": versions, "cuda": torch.version.cuda,
               "format": "FP8Linear: e4m3 weight + fp32 per-row weight_scale, plain safetensors shards",
               "weights": "random (speed does not depend on values)"}
    t_all = time.perf_counter()
    ref = bake_phase(work, results)
    load_phase(results, "page_cache", work / "baked", ref)
    results["cold_method"] = drop_cache(work / "baked")
    load_phase(results, "cold", work / "baked")
    bf16_quant_phase(work, results)
    shutil.rmtree(work / "bf16")
    results["total_s"] = round(time.perf_counter() - t_all, 1)
    save(results)
    print(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
