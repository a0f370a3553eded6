"""`python -m bench latency`: stock diffusers vs this worker's recipe, side by side, one process.

FLUX.1-dev shape (28 steps, guidance 3.5) and SDXL shape (30 steps, CFG 5), 1024x1024, batch 1,
random weights. For each model the stock pipeline is measured first, then the recipe is applied
to the same weights (so fidelity compares like with like), then measured again. JSON and a PNG go
to bench/results/ (and $OUT when set).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time

import torch

from app.families import FAMILIES
from app.optimize import Recipe, apply_recipe
from bench import timing

MODELS = {"flux": (28, 3.5), "sdxl": (30, 5.0)}


def _denoiser_inputs(pipe, name: str) -> dict:
    """Fixed random inputs for one denoiser forward (fidelity check)."""
    g = torch.Generator("cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    if name == "flux":
        return dict(hidden_states=rnd(1, 4096, 64), encoder_hidden_states=rnd(1, 512, 4096),
                    pooled_projections=rnd(1, 768), timestep=torch.tensor([0.5], device="cuda", dtype=torch.bfloat16),
                    guidance=torch.tensor([3.5], device="cuda", dtype=torch.bfloat16),
                    img_ids=torch.zeros(4096, 3, device="cuda", dtype=torch.bfloat16),
                    txt_ids=torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16), return_dict=False)
    return dict(sample=rnd(2, 4, 128, 128), timestep=torch.tensor(500, device="cuda"),
                encoder_hidden_states=rnd(2, 77, 2048),
                added_cond_kwargs=dict(text_embeds=rnd(2, 1280), time_ids=torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2,
                                                                                       device="cuda", dtype=torch.bfloat16)),
                return_dict=False)


def _forward(pipe, name, inputs):
    with torch.inference_mode():
        return getattr(pipe, FAMILIES[name].denoiser)(**inputs)[0].float()


def run_model(name: str, recipe: Recipe) -> dict:
    from bench.models import build_flux_dev, build_sdxl

    steps, guidance = MODELS[name]
    pipe = build_flux_dev() if name == "flux" else build_sdxl()
    out = {"stock": {"warmup_s": timing.warm(pipe, name, guidance)}}
    out["stock"].update(timing.measure(pipe, name, steps, guidance))
    inputs = _denoiser_inputs(pipe, name)
    ref = _forward(pipe, name, inputs)
    t0 = time.perf_counter()
    out["recipe"] = recipe.to_dict()
    out["ours"] = {"apply_ms": apply_recipe(pipe, FAMILIES[name], recipe)}
    gc.collect(); torch.cuda.empty_cache()
    out["ours"]["warmup_s"] = timing.warm(pipe, name, guidance)
    out["ours"]["apply_and_warmup_s"] = round(time.perf_counter() - t0, 2)
    out["ours"].update(timing.measure(pipe, name, steps, guidance))
    got = _forward(pipe, name, inputs)
    out["ours"]["rel_err_vs_stock"] = round(((got - ref).norm() / ref.norm()).item(), 5)
    out["ratio_e2e"] = round(out["stock"]["e2e_s"] / out["ours"]["e2e_s"], 2)
    out["ratio_per_step"] = round(out["stock"]["per_step_ms"] / out["ours"]["per_step_ms"], 2)
    if name == "flux":
        from bench.profile import profile_step

        out["profile"] = profile_step(pipe)
    del pipe
    gc.collect(); torch.cuda.empty_cache(); torch._dynamo.reset()
    return out


def versions() -> dict:
    import diffusers
    import transformers

    v = dict(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
             torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__,
             transformers=transformers.__version__, python=platform.python_version(),
             date=time.strftime("%Y-%m-%d"), weights="random (real architecture)")
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def main(models=("flux", "sdxl"), compile_mode: str = "regional", attention: str = "fa3") -> dict:
    res = {"versions": versions(), "shape": "1024x1024, batch 1"}
    for name in models:
        recipe = Recipe(fuse_qkv=True, quantize="fp8", attention=attention, compile=compile_mode)
        try:
            res[name] = run_model(name, recipe)
        except Exception as e:  # keep the other model's figures
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        write(res)
    return res


def write(res: dict) -> None:
    from bench.plot import plot_latency

    slug = res["versions"]["gpu"].replace("NVIDIA ", "").replace(" ", "-").lower()
    for folder in filter(None, ("bench/results", os.environ.get("OUT"))):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"latency_{slug}.json"), "w") as f:
            json.dump(res, f, indent=1)
        plot_latency(res, os.path.join(folder, f"latency_{slug}.png"))
    print(json.dumps({k: v for k, v in res.items() if k != "versions"})[:3000], flush=True)
