"""`python -m bench latency`: stock diffusers vs this worker's recipe, side by side, one process.

FLUX.1-dev shape (28 steps, guidance 3.5) and SDXL shape (30 steps, CFG 5), 1024x1024, batch 1,
random weights (`--tiny`: app.tiny's models, which check the plumbing on a CPU). For each model the
stock pipeline is measured first, then the recipe is applied to the same weights (so fidelity
compares like with like), then measured again. JSON and a PNG go to `out_dir` (bench/results/ by
default) and $OUT when set.
"""

from __future__ import annotations

import gc
import platform
import time

import torch

from app.config import Settings
from app.families import FAMILIES
from app.optimize import Recipe, apply_recipe, choose_recipe
from bench import timing
from preflight import Plan

# Relative L2 error of the optimized denoiser's output vs stock bf16 eager, same inputs, that the
# bench accepts (docs/speed.md). Measured on H100 with random full-size weights: 0.098 (FLUX).
FIDELITY_BOUND = 0.15


def _forward(pipe, family, inputs):
    with torch.inference_mode():
        return getattr(pipe, family.denoiser)(**inputs)[0].float()


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_model(name: str, recipe: Recipe, build=None, size: int = 1024, steps: int | None = None, reps: int = 3,
              profile: bool = False) -> dict:
    """Stock, then the recipe on the same weights: timings, ratios, fidelity (and a profile on CUDA).

    `build` makes the pipeline (default: the full-size random-weight model of bench.models on the
    GPU); a test passes app.tiny's builders with a small `size` and few `steps` to run the same
    plumbing on a CPU. `profile` adds a profile of one step (on CUDA).
    """
    from bench.models import FULL_SIZE

    build = build or FULL_SIZE[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    family = FAMILIES[name].variant(getattr(pipe, FAMILIES[name].denoiser).config)
    steps = steps or family.defaults.steps
    out = {"stock": {"warmup_s": timing.warm(pipe, family, size)}}
    out["stock"].update(timing.measure(pipe, family, steps, size, reps))
    inputs = family.denoiser_inputs(pipe, size, size)
    ref = _forward(pipe, family, inputs)
    t0 = time.perf_counter()
    out["recipe"] = recipe.to_dict()
    out["ours"] = {"apply_ms": apply_recipe(pipe, family, recipe)}
    _release()
    out["ours"]["warmup_s"] = timing.warm(pipe, family, size)
    out["ours"]["apply_and_warmup_s"] = round(time.perf_counter() - t0, 2)
    out["ours"].update(timing.measure(pipe, family, steps, size, reps))
    got = _forward(pipe, family, inputs)
    out["ours"]["rel_err_vs_stock"] = round(((got - ref).norm() / ref.norm()).item(), 5)
    out["ours"]["fidelity_bound"] = FIDELITY_BOUND
    out["ours"]["fidelity_ok"] = out["ours"]["rel_err_vs_stock"] <= FIDELITY_BOUND
    if recipe.cuda_graphs:
        kw = dict(height=size, width=size, num_inference_steps=min(steps, 4),
                  guidance_scale=family.defaults.guidance, output_type="latent")
        with torch.inference_mode():
            emb = family.encode(pipe, timing.PROMPT)
        out["ours"]["graph_vs_plain_rel_err"] = timing.graph_vs_plain(pipe, family, emb, kw)
    out["ratio_e2e"] = round(out["stock"]["e2e_s"] / out["ours"]["e2e_s"], 2)
    out["ratio_per_step"] = round(out["stock"]["per_step_ms"] / out["ours"]["per_step_ms"], 2)
    if profile and torch.cuda.is_available():  # the profiler's kernels are GPU ones
        from bench.profile import profile_step

        out["profile"] = profile_step(pipe)
    del pipe
    _release()
    torch._dynamo.reset()
    return out


def _host_cpu() -> str:
    """The host's CPU model: launch-bound paths (SDXL's UNet without graphs) run at its speed, and the
    same GPU kind has measured 55 and 84 ms per stock SDXL step on two machines."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x{len(names)}" if names else platform.processor()
    except OSError:
        return platform.processor()


def _commit() -> str | None:
    """The commit measured: $COMMIT where the tree travels without its .git (the device), else git's."""
    import os
    import subprocess

    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import diffusers
    import transformers

    cuda = torch.cuda.is_available()
    v = dict(gpu=torch.cuda.get_device_name(0) if cuda else f"cpu {platform.machine()}",
             capability=list(torch.cuda.get_device_capability(0)) if cuda else None,
             torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__,
             transformers=transformers.__version__, python=platform.python_version(),
             date=time.strftime("%Y-%m-%d"), weights="random (real architecture)", host_cpu=_host_cpu(),
             commit=_commit())
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def _recipe(name: str, compile_mode: str, attention: str, cuda_graphs: bool | None, fuse_gelu_quant: bool) -> Recipe:
    """The worker's own FP8 recipe (`choose_recipe` for an FP8 Hopper plan) with this run's settings, also
    when the plumbing runs on a CPU (where the worker would quantize nothing); there attention stays
    PyTorch's SDPA: cuDNN and FA3 are CUDA kernels, and compiling them on a CPU fails."""
    if not torch.cuda.is_available():
        attention = "native"
    plan = Plan("cuda", "fp8", (9, 0), "bench")
    settings = Settings(attention=attention, compile=compile_mode, cuda_graphs=cuda_graphs)
    chosen = choose_recipe(plan, settings, FAMILIES[name])
    return Recipe(**{**chosen.to_dict(), "fuse_gelu_quant": fuse_gelu_quant})


def main(models=("flux", "sdxl"), compile_mode: str = "regional", attention: str = "fa3",
         out_dir: str = "bench/results", builders: dict | None = None, size: int = 1024, steps: int | None = None,
         reps: int = 3, cuda_graphs: bool | None = None, inductor: dict | None = None,
         fuse_gelu_quant: bool = True, profile: tuple[str, ...] = ("flux",)) -> dict:
    """Run each model (errors are kept per model), writing JSON and PNG to `out_dir` (and $OUT) after each.

    `cuda_graphs` None follows each family's default, as the worker does when CUDA_GRAPHS is unset."""
    res = {"versions": versions(), "shape": f"{size}x{size}, batch 1", "size": size}
    if inductor:
        import torch._inductor.config as ic

        for k, v in inductor.items():
            setattr(ic, k, int(v))
        res["inductor"] = inductor
    for name in models:
        recipe = _recipe(name, compile_mode, attention, cuda_graphs, fuse_gelu_quant)
        try:
            res[name] = run_model(name, recipe, (builders or {}).get(name), size, steps, reps, name in profile)
        except Exception as e:  # keep the other model's figures
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        write(res, out_dir)
    return res


def write(res: dict, out_dir: str = "bench/results") -> list[str]:
    """latency_<gpu>.json and .png into `out_dir` and $OUT (when set); the paths written."""
    from bench.output import save_json
    from bench.plot import plot_latency

    written = save_json(res, "latency", out_dir)
    for path in list(written):
        plot_latency(res, path.removesuffix(".json") + ".png")
        written.append(path.removesuffix(".json") + ".png")
    return written
