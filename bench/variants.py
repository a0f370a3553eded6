"""`python -m bench variants`: per-step time of recipe variants on the FLUX.1-dev shape (random
weights, 1024x1024), each on a freshly built pipeline, to choose the recipe by measurement."""

from __future__ import annotations

import gc
import json
import os
import time

import torch

from app.families import FLUX
from app.optimize import Recipe, apply_recipe
from bench import timing

VARIANTS = {
    "regional": (Recipe(True, "fp8", "fa3", False, "regional"), {}),
    "full": (Recipe(True, "fp8", "fa3", False, "full"), {}),
    "regional_cdt": (Recipe(True, "fp8", "fa3", False, "regional"), {"coordinate_descent_tuning": True}),
    "regional_cudnn": (Recipe(True, "fp8", "cudnn", False, "regional"), {}),
    # CUDA graphs (what mode="reduce-overhead" turns on) around each compiled block: the step's
    # launch gaps (~6 ms of 99 on the H100 profile) against the input copies graphs need.
    "regional_cudagraphs": (Recipe(True, "fp8", "fa3", False, "regional"), {"triton.cudagraphs": True}),
    # The same, with app.cudagraphs: one graph around the whole denoiser call.
    "regional_graphs": (Recipe(True, "fp8", "fa3", False, "regional", cuda_graphs=True), {}),
    # Inductor's multi-kernel: also emits persistent (one-read) versions of the activation-quantizing
    # row reductions up to 16k wide (FLUX's 3072-15360) and picks the faster at run time; the H100
    # profile put those reductions at 16 ms of a 99 ms step.
    "regional_mk": (Recipe(True, "fp8", "fa3", False, "regional"), {"triton.multi_kernel": 1}),
    "regional_fa3fp8": (Recipe(True, "fp8", "fa3_fp8", False, "regional"), {}),
    # Inductor realizes (stores, then re-reads) a pointwise producer of more than 30 ops that two
    # loops of a reduction read: the single blocks' gelu+bias+concat before FP8Linear's row quantizer
    # is stored and read back (bench/results/quant_kernel_h200.json). A higher threshold recomputes it.
    "regional_inline": (Recipe(True, "fp8", "fa3", False, "regional"), {"realize_opcount_threshold": 100}),
    # app.fused: one Triton kernel from the MLP GEMM's output to the next FP8 GEMM's input. This is the
    # worker's FP8 recipe (choose_recipe); the variants above are without it, as they were measured.
    "regional_fused": (Recipe(True, "fp8", "fa3", False, "regional", fuse_gelu_quant=True), {}),
}


def _config(ic, dotted: str):
    """(object, attribute) of an inductor setting such as `triton.cudagraphs`."""
    *path, attr = dotted.split(".")
    obj = ic
    for part in path:
        obj = getattr(obj, part)
    return obj, attr


def run(names, profile: bool = False) -> dict:
    import torch._inductor.config as ic

    from bench.latency import _denoiser_inputs, _forward, versions
    from bench.models import build_flux_dev

    res = {"versions": versions()}
    for name in names:
        recipe, flags = VARIANTS[name]
        saved = {k: getattr(*_config(ic, k)) for k in flags}
        try:
            for k, v in flags.items():
                setattr(*_config(ic, k), v)
            pipe = build_flux_dev()
            pipe.set_progress_bar_config(disable=True)
            inputs = _denoiser_inputs(pipe, "flux")
            ref = _forward(pipe, "flux", inputs)  # bf16 eager, same weights (seeded build)
            apply_recipe(pipe, FLUX, recipe)
            t0 = time.perf_counter()
            first = timing.warm(pipe, "flux", 3.5)
            with torch.inference_mode():
                emb = timing._encode(pipe, "flux")
                kw = dict(height=1024, width=1024, num_inference_steps=8, guidance_scale=3.5, output_type="latent")
                ts = [timing.timed(lambda: pipe(**emb, **kw))[0] * 1000 / 8 for _ in range(3)]
            got = _forward(pipe, "flux", inputs)
            res[name] = dict(first_call_s=first, compile_and_warm_s=round(time.perf_counter() - t0, 1),
                             per_step_ms=round(timing.med(ts), 1), flags=flags, recipe=recipe.to_dict(),
                             rel_err_vs_bf16=round(((got - ref).norm() / ref.norm()).item(), 5))
            if recipe.fuse_gelu_quant:
                import app.fused

                res[name]["fused_warps"] = app.fused.NUM_WARPS
            if profile:
                from bench.profile import profile_step

                res[name]["profile"] = profile_step(pipe)
            if recipe.cuda_graphs:
                res[name]["graph_vs_plain_rel_err"] = timing.graph_vs_plain(pipe, "flux", emb, kw)
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            for k, v in saved.items():
                setattr(*_config(ic, k), v)
            pipe = None
            gc.collect(); torch.cuda.empty_cache(); torch._dynamo.reset()
        out = os.environ.get("OUT", "bench/results")
        with open(os.path.join(out, "variants.json"), "w") as f:
            json.dump(res, f, indent=1)
        print("VARIANT", name, json.dumps(res[name]), flush=True)
    return res
