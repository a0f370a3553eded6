"""`python -m bench lora`: per-job LoRA on FP8 FLUX through the worker's real Service path.

Two workers on the same random FLUX.1-dev weights, each loaded, compiled and warmed as deployed:
  plain   LORAS unset: today's recipe; a plain job, twice (the baseline).
  loras   LORAS=1 (branches of LORA_MAX_RANK beside every denoiser linear): a plain job (zero branches),
          LoRA A on first use (read from the disk cache, converted, written into the branches), A again
          (the goal: at most 1.05x the plain worker's job), a switch to LoRA B and back to A (the goal:
          at most 1 s more than a job that keeps its LoRA), then plain again.
Every job reports Dynamo's compiled-graph count before and after: a LoRA job must compile nothing.
On CUDA one branch-carrying FP8 linear is also checked against its dequantized fp32 reference (the
FP8 GEMM path is GPU-only; the CPU tests cover the reference path). `--tiny`: the tiny FLUX on a CPU
(plumbing only, no figures). Random weights and random LoRAs: the speed is real, the images are not.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

from bench.timing import PROMPT

# The layers a FLUX LoRA usually adapts (ai-toolkit / Kohya defaults), in diffusers' unfused names.
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def random_lora(transformer, rank: int, seed: int) -> bytes:
    """A peft-format LoRA of `rank` on the usual FLUX layers of this (unfused) transformer, in bf16."""
    import torch
    from safetensors.torch import save

    mods = dict(transformer.named_modules())
    g = torch.Generator().manual_seed(seed)
    state = {}
    names = [f"transformer_blocks.{i}.{n}" for i in range(len(transformer.transformer_blocks)) for n in DOUBLE]
    names += [f"single_transformer_blocks.{i}.{n}" for i in range(len(transformer.single_transformer_blocks))
              for n in SINGLE]
    for name in names:
        m = mods[name]
        a = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
        state[f"transformer.{name}.lora_A.weight"] = a.bfloat16()
        state[f"transformer.{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.01).bfloat16()
    return save(state)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _jobs(service, jobs: list[tuple[str, dict]]) -> dict:
    from app.optimize import graphs_compiled

    out = {}
    for name, job in jobs:
        before = graphs_compiled()
        _sync()
        t = time.perf_counter()
        res = service.run(job, f"lora-{name}")
        _sync()
        rec = {"wall_s": round(time.perf_counter() - t, 3), "graphs_compiled": graphs_compiled() - before}
        rec.update(res.get("timings", {}) if "images" in res else {"error": res.get("error")})
        out[name] = rec
    return out


def branch_check(service) -> dict | None:
    """One LoRA-carrying FP8 linear on CUDA against x @ (W + B A)^T in fp32 from its own stored tensors."""
    import torch

    from weights.lora_branch import LoRAFP8Linear

    mods = [m for m in service.loras.slots.values() if isinstance(m, LoRAFP8Linear) and m.lora_B.abs().sum() > 0]
    if not mods or mods[0].weight.device.type != "cuda":
        return None
    m = mods[0]
    x = torch.randn(4096, m.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = m(x).float()
        w = m.weight.float() * m.weight_scale + m.lora_B.float() @ (m.lora_A.float() * m.lora_A_scale)
        want = x.float() @ w.t() + (m.bias.float() if m.bias is not None else 0)
        lora_part = (x.float() @ (m.lora_A.float() * m.lora_A_scale).t()) @ m.lora_B.float().t()
    return {"rel_err": round(((got - want).norm() / want.norm()).item(), 5),
            "lora_share": round((lora_part.norm() / want.norm()).item(), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU: the tiny FLUX pipeline (plumbing only)")
    ap.add_argument("--size", type=int, default=None, help="default 1024 (tiny: 256)")
    ap.add_argument("--steps", type=int, default=None, help="default 28 (tiny: 2)")
    ap.add_argument("--max-rank", type=int, default=64, help="LORA_MAX_RANK of the LoRA worker")
    ap.add_argument("--lora-rank", type=int, default=16, help="the random LoRAs' rank")
    ap.add_argument("--workers", default="plain,loras", help="which workers to run (plain, loras)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    import torch

    from app.config import Settings
    from bench.capped_models import model  # the same loading seam
    from bench.latency import versions
    from bench.output import save_json

    cuda = torch.cuda.is_available() and not args.tiny
    size = args.size or (1024 if cuda else 256)
    steps = args.steps or (28 if cuda else 2)
    job = {"prompt": PROMPT, "width": size, "height": size, "num_inference_steps": steps, "seed": 0}
    source, build = model("flux", not cuda)
    work = tempfile.mkdtemp(prefix="bench-lora-")
    base = dict(output_uri=f"{work}/out", job_timeout_s=3600, shapes=f"{size}x{size}",
                compile="regional" if cuda else "off", device="cuda" if cuda else "cpu", cache_dir=work, preflight=cuda)
    res = {"versions": versions(), "size": size, "steps": steps, "max_rank": args.max_rank, "lora_rank": args.lora_rank,
           "weights": "random"}
    workers = args.workers.split(",")
    failed = False
    if "plain" in workers:
        try:
            res["plain"] = _worker(source, build, Settings(**base), [("plain", job), ("plain2", job)])
        except Exception as e:
            res["plain"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            failed = True
        _release()
    if "loras" in workers:
        try:
            res["loras"] = _lora_worker(source, build, Settings(loras=True, lora_max_rank=args.max_rank, **base), job,
                                        args.lora_rank)
        except Exception as e:
            res["loras"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            failed = True
    _summary(res)
    save_json(res, "lora" if cuda else "lora_tiny", args.out)

    return 1 if failed else 0


def _worker(source, build, settings, jobs) -> dict:
    from app.memory import load_device
    from app.service import Service

    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    service = Service.load(settings, source=source, loader=lambda src, plan, cache_dir: pipe.to(load_device(plan)))
    out = {"load_s": round(time.perf_counter() - t0, 1), "jobs": _jobs(service, jobs)}
    return out


def _lora_worker(source, build, settings, job, rank: int) -> dict:
    from app.memory import load_device
    from app.service import Service

    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    files = [random_lora(pipe.transformer, rank, seed) for seed in (1, 2)]  # before the recipe fuses QKV
    t0 = time.perf_counter()
    service = Service.load(settings, source=source, loader=lambda src, plan, cache_dir: pipe.to(load_device(plan)))
    load_s = round(time.perf_counter() - t0, 1)
    shas = [service.loras.cache.get(f"bench://{i}", lambda f=f: f)[0] for i, f in enumerate(files)]  # on disk
    lora = [{**job, "loras": [{"source": f"https://bench.invalid/{i}.safetensors", "sha256": sha, "scale": 0.8}]}
            for i, sha in enumerate(shas)]
    jobs = [("plain", job), ("a_first", lora[0]), ("a", lora[0]), ("a2", lora[0]), ("switch_b", lora[1]),
            ("switch_a", lora[0]), ("plain_after", job)]
    out = {"load_s": load_s, "lora_mb": round(len(files[0]) / 2**20, 1), "branches": len(service.loras.slots),
           "jobs": _jobs(service, jobs)}
    service.loras.use(parse_refs(service, lora[0]), fetch=None)  # A again (the sha256 finds it on disk)
    out["branch_check"] = branch_check(service)
    return out


def parse_refs(service, job):
    from app.schema import parse_job

    return parse_job(job, service.family).loras


def _summary(res: dict) -> None:
    plain = res.get("plain", {}).get("jobs", {}).get("plain2", {})
    jobs = res.get("loras", {}).get("jobs", {})
    if not plain.get("total_ms") or not jobs.get("a", {}).get("total_ms"):
        return
    keep = min(jobs["a"]["total_ms"], jobs["a2"]["total_ms"])
    res["summary"] = {
        "lora_job_over_plain_worker": round(keep / plain["total_ms"], 3), "goal_at_most": 1.05,
        "plain_job_on_lora_worker_over_plain_worker": round(jobs["plain"]["total_ms"] / plain["total_ms"], 3),
        "switch_extra_s": round((max(jobs["switch_b"]["total_ms"], jobs["switch_a"]["total_ms"]) - keep) / 1000, 3),
        "switch_goal_at_most_s": 1.0,
        "graphs_compiled_by_lora_jobs": sum(j.get("graphs_compiled", 0) for n, j in jobs.items()),
    }


def _release():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


if __name__ == "__main__":
    raise SystemExit(main())
