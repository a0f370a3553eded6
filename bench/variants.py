"""`python -m bench variants`: per-step time of recipe variants on the FLUX.1-dev shape (random
weights, 1024x1024), each on a freshly built pipeline, to choose the recipe by measurement."""

from __future__ import annotations

import gc
import json
import os
import time

import torch

from app.families import FAMILIES
from app.optimize import Recipe, apply_recipe
from bench import timing

FLUX = FAMILIES["flux"]


def _fp8(attention: str = "fa3", compile: str = "regional", **kw) -> Recipe:
    """The FP8 Hopper recipe with one thing changed (without the GELU kernel unless asked: the variants
    below were measured before it existed)."""
    return Recipe(fuse_qkv=True, quantize="fp8", attention=attention, compile=compile, **kw)


VARIANTS = {
    "regional": (_fp8(), {}),
    "full": (_fp8(compile="full"), {}),
    "regional_cdt": (_fp8(), {"coordinate_descent_tuning": True}),
    "regional_cudnn": (_fp8("cudnn"), {}),
    # CUDA graphs (what mode="reduce-overhead" turns on) around each compiled block: the step's
    # launch gaps (~6 ms of 99 on the H100 profile) against the input copies graphs need.
    "regional_cudagraphs": (_fp8(), {"triton.cudagraphs": True}),
    # The same, with app.cudagraphs: one graph around the whole denoiser call.
    "regional_graphs": (_fp8(cuda_graphs=True), {}),
    # Inductor's multi-kernel: also emits persistent (one-read) versions of the activation-quantizing
    # row reductions up to 16k wide (FLUX's 3072-15360) and picks the faster at run time; the H100
    # profile put those reductions at 16 ms of a 99 ms step.
    "regional_mk": (_fp8(), {"triton.multi_kernel": 1}),
    "regional_fa3fp8": (_fp8("fa3_fp8"), {}),
    # Inductor realizes (stores, then re-reads) a pointwise producer of more than 30 ops that two
    # loops of a reduction read: the single blocks' gelu+bias+concat before FP8Linear's row quantizer
    # is stored and read back (bench/results/quant_kernel_h200.json). A higher threshold recomputes it.
    "regional_inline": (_fp8(), {"realize_opcount_threshold": 100}),
    # app.fused: one Triton kernel from the MLP GEMM's output to the next FP8 GEMM's input. This is the
    # worker's FP8 recipe (choose_recipe); the variants above are without it, as they were measured.
    "regional_fused": (_fp8(fuse_gelu_quant=True), {}),
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

    from bench.latency import _forward, versions
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
            inputs = FLUX.denoiser_inputs(pipe, 1024, 1024)
            ref = _forward(pipe, FLUX, inputs)  # bf16 eager, same weights (seeded build)
            apply_recipe(pipe, FLUX, recipe)
            t0 = time.perf_counter()
            first = timing.warm(pipe, FLUX)
            with torch.inference_mode():
                emb = FLUX.encode(pipe, timing.PROMPT)
                kw = dict(height=1024, width=1024, num_inference_steps=8, guidance_scale=3.5, output_type="latent")
                ts = [timing.timed(lambda: pipe(**emb, **kw))[0] * 1000 / 8 for _ in range(3)]
            got = _forward(pipe, FLUX, inputs)
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
                res[name]["graph_vs_plain_rel_err"] = timing.graph_vs_plain(pipe, FLUX, emb, kw)
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
