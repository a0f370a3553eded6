"""GPU bench: baked FP8 FLUX.1-dev-shape transformer load vs bf16 from_pretrained + quantize.

python -m bench.weights_load [--dir /path/with/60GB] [--s3-gb 4]
Writes bench/results/weights_<gpu>.json (or $OUT/weights_<gpu>.json). Random weights (speed does not
depend on their values; fidelity is measured on the same random model). Phases, each with wall
time, GB/s, peak host RSS and peak VRAM:
  bake        build on the GPU, save a bf16 copy, fuse + FP8 per-row (our skip list), write baked dir
  page_cache  load the baked denoiser right after writing it (files in the page cache)
  cold        a fresh copy of the baked dir, page cache dropped (drop_caches, else fadvise DONTNEED)
  bf16_quant  diffusers from_pretrained of the bf16 save, then quantize on the GPU (the usual recipe)
  s3          --s3-gb of the baked shards streamed from moto's S3 server on loopback, hash-checked
  fidelity    FP8 output vs bf16 output on the same inputs (256 image + 64 text tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch


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


def build_transformer():
    """FLUX.1-dev shape on the GPU, bf16, reinit normal(0, 0.02) as shared/probes/flux_random.py."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        t = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in t.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
            elif "weight" in n or n.endswith("scale"):
                p.fill_(1.0)
            else:
                p.zero_()
    return t.eval()


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


def same_bytes_as_torchao() -> bool:
    """Our CPU FP8 path (baking without a GPU) gives the bytes torchao's quantize_ gives on the GPU."""
    from app.families import FLUX
    from weights.quantize import _fp8_from_config, quant_config, quantize_denoiser

    lin = torch.nn.Sequential(torch.nn.Linear(3072, 3072, dtype=torch.bfloat16, device="cuda"))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = lin

    w = lin[0].weight.detach().clone()
    quantize_denoiser(Wrap(), FLUX, "fp8")
    ours = _fp8_from_config(w.cpu(), quant_config("fp8"))
    return torch.equal(ours.qdata.view(torch.uint8), lin[0].weight.qdata.cpu().view(torch.uint8)) and \
        torch.equal(ours.scale, lin[0].weight.scale.cpu())


def bake_phase(work: Path, results: dict):
    from app.families import FLUX
    from weights import manifest as mf
    from weights.quantize import quant_config, quantize_denoiser
    from weights.serialize import write_denoiser

    with phase(results, "bake") as rec:
        t = build_transformer()
        with torch.no_grad():
            ref = t(**inputs()).sample.float()
        t0 = time.perf_counter()
        t.save_pretrained(work / "bf16" / "transformer")
        rec["bf16_save_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        quantized = quantize_denoiser(t, FLUX, "fp8")
        rec["quantize_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        write_denoiser(t, work / "baked" / "transformer")
        mf.write(work / "baked", {"source": {"id": "random flux.1-dev shape", "revision": None}, "family": "flux",
                                  "denoiser": "transformer", "vram_gib": None,
                                  "recipe": {"precision": "fp8", "fused_qkv": True, "config": repr(quant_config("fp8")),
                                             "skip": list(FLUX.quant_skip), "quantized_layers": len(quantized)}})
        rec.update(write_and_hash_s=round(time.perf_counter() - t0, 1), quantized_layers=len(quantized))
        del t
    return ref


def load_phase(results: dict, name: str, root: Path, ref=None):
    from app.plan import Plan
    from weights import manifest as mf
    from weights.load import load_denoiser

    manifest = mf.read(root)
    nbytes = sum(i["size"] for n, i in manifest["files"].items() if n.endswith(".safetensors"))
    with phase(results, name, nbytes):
        model = load_denoiser(root, manifest, Plan("cuda", "fp8", (9, 0)))
    if ref is not None:
        with torch.no_grad():
            out = model(**inputs()).sample.float()
        results["fidelity"] = {"rel_err": round(((out - ref).norm() / ref.norm()).item(), 5),
                               "image_tokens": 256, "text_tokens": 64}
        print("fidelity", results["fidelity"], flush=True)
    del model


def bf16_quant_phase(work: Path, results: dict):
    from diffusers import FluxTransformer2DModel

    from app.families import FLUX
    from weights.quantize import quantize_denoiser

    nbytes = sum(p.stat().st_size for p in (work / "bf16" / "transformer").glob("*.safetensors"))
    with phase(results, "bf16_quant", nbytes) as rec:
        t0 = time.perf_counter()
        t = FluxTransformer2DModel.from_pretrained(work / "bf16" / "transformer", torch_dtype=torch.bfloat16).to("cuda")
        torch.cuda.synchronize()
        rec["from_pretrained_s"] = round(time.perf_counter() - t0, 2)
        rec["bf16_page_cache"] = "as left by the bake (not dropped): the usual recipe's best case"
        quantize_denoiser(t, FLUX, "fp8")
        del t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/weights-bench")
    ap.add_argument("--s3-gb", type=float, default=4.0)
    args = ap.parse_args()
    import diffusers
    import torchao

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gpu = torch.cuda.get_device_name(0)
    results = {"gpu": gpu, "torch": torch.__version__, "torchao": torchao.__version__,
               "diffusers": diffusers.__version__, "weights": "random (speed does not depend on values)"}
    results["cpu_fp8_path_equals_torchao"] = same_bytes_as_torchao()
    ref = bake_phase(work, results)
    load_phase(results, "page_cache", work / "baked", ref)
    shutil.copytree(work / "baked", work / "cold")
    results["cold_method"] = drop_cache(work / "cold")
    load_phase(results, "cold", work / "cold")
    shutil.rmtree(work / "cold")
    bf16_quant_phase(work, results)
    try:
        from bench.weights_s3 import s3_phase

        s3_phase(work / "baked", results, args.s3_gb, phase)
    except ImportError as e:
        results["s3"] = {"skipped": f"moto server not installed ({e})"}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"weights_{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
