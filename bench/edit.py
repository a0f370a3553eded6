"""`python -m bench edit`: one Qwen-Image-Edit(-Plus) denoising step with true CFG, stock vs this worker's
recipe, side by side in one process (QwenImageTransformer2DModel, 20.4B, random weights built on the GPU).

A 1024x1024 edit with one 1024x1024 reference image: 4096 output + 4096 reference image tokens and
300 text tokens; a CFG step is two transformer forwards (positive, negative), run one after the other
(batching them measured 1% faster on an H200, issue 15). The pipeline drops the text mask for a batch
of one, so FA3 (which takes no mask) sees what a job gives it. Each variant starts from a copy of the
same bf16 weights; its relative error is against the stock bf16 eager forward on the same inputs.

`python -m bench edit` runs this as its last section (`cfg_step`), after bench/edit_e2e.py's sections:
Qwen-Image-Edit-Plus end to end through Service.run, FLUX Kontext vs FLUX per step, text encoders FP8.
"""

from __future__ import annotations

import copy
import gc
import time

import torch

from bench import timing
from bench.models import reinit

# Embedders, final projection and the modulation layers stay bf16 (as for FLUX); `img_mlp` is the
# variant that also keeps the image MLPs bf16, the layers known to be sensitive.
QWEN_SKIP = (r"img_in", r"txt_in", r"time_text_embed\..*", r"norm_out\..*", r"proj_out", r".*img_mod\..*",
             r".*txt_mod\..*")
VARIANTS = {
    "stock_compiled": dict(quantize="none", attention="native", compile="regional"),
    "fp8_fa3": dict(quantize="fp8", attention="fa3", compile="regional"),
    "fp8_fa3_mlp_bf16": dict(quantize="fp8", attention="fa3", compile="regional", skip=(r".*img_mlp\..*",)),
    "fp8_fa3fp8": dict(quantize="fp8", attention="fa3_fp8", compile="regional"),
}


def build(device="cuda", **config):
    """Qwen-Image's transformer (its published config unless `config` narrows it: the CPU test's)."""
    from bench.models import build_qwen_image_transformer

    return build_qwen_image_transformer(device, **config)


def inputs(t, size: int = 1024, text: int = 300, seed: int = 0):
    """(positive, negative) keyword arguments of one forward: output + one reference image of `size`."""
    dev = next(t.parameters()).device
    g = torch.Generator(dev.type).manual_seed(seed)
    side = size // 16  # VAE 8x, then 2x2 patches
    tokens = 2 * side * side
    rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=torch.bfloat16)  # noqa: E731
    latents = rnd(1, tokens, t.config.in_channels)

    def one(n):
        return dict(hidden_states=latents, encoder_hidden_states=rnd(1, n, t.config.joint_attention_dim),
                    encoder_hidden_states_mask=None, timestep=torch.tensor([0.5], device=dev, dtype=torch.bfloat16),
                    img_shapes=[[(1, side, side), (1, side, side)]], return_dict=False)

    return one(text), one(text - 40)  # the negative prompt is shorter


def cfg_step(t, pos, neg):
    with torch.inference_mode():
        return t(**pos)[0], t(**neg)[0]


def apply(t, quantize: str, attention: str, compile: str, skip=()):
    from app.attention import set_attention
    from weights.quantize import quantize_denoiser, skip_patterns

    rule = skip_patterns(QWEN_SKIP + tuple(skip))
    n = len(quantize_denoiser(t, quantize, rule, fuse=False)) if quantize != "none" else 0  # Qwen reads to_q/k/v
    used = set_attention(t, attention) if attention != "native" else "native"
    if compile == "regional":
        t.compile_repeated_blocks(fullgraph=True, dynamic=False)
    return {"quantized_linears": n, "attention_used": used}


def measure(t, pos, neg, reps: int = 5) -> dict:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first, _ = timing.timed(lambda: cfg_step(t, pos, neg))
    timing.timed(lambda: cfg_step(t, pos, neg))
    times = [timing.timed(lambda: cfg_step(t, pos, neg))[0] for _ in range(reps)]
    return dict(first_call_s=round(first, 2), cfg_step_s=timing.med(times), all_s=[round(x, 4) for x in times],
                peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)


def cfg_variants(names, build_fn, size: int, text: int, save, deadline: float = float("inf"), variants=None) -> dict:
    """Stock eager, then each variant from a copy of the same bf16 weights; `save()` after each."""
    res = {"model": "QwenImageTransformer2DModel (Qwen-Image-Edit shape), random weights",
           "shape": f"{size}x{size} output + one {size}x{size} reference, {text} text tokens, true CFG"}
    base = build_fn()
    pos, neg = inputs(base, size, text)
    ref = cfg_step(base, pos, neg)[0].float()
    res["stock_eager"] = measure(base, pos, neg)
    save(res)
    for name in names:
        if time.perf_counter() > deadline:
            res[name] = {"skipped": "past the budget"}
            continue
        t = None
        try:
            t = copy.deepcopy(base)
            t0 = time.perf_counter()
            res[name] = apply(t, **(variants or VARIANTS)[name])
            res[name]["apply_s"] = round(time.perf_counter() - t0, 2)
            res[name].update(measure(t, pos, neg))
            got = cfg_step(t, pos, neg)[0].float()
            res[name]["rel_err_vs_stock"] = round(((got - ref).norm() / ref.norm()).item(), 5)
            res[name]["vs_stock_eager"] = round(res["stock_eager"]["cfg_step_s"] / res[name]["cfg_step_s"], 2)
        except Exception as e:  # keep the other variants' figures
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        del t
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        save(res)
        print("EDIT", name, res[name], flush=True)
    return res


def tiny_build():
    """A 2-block Qwen-Image transformer on the CPU; larger weights than the full-size build's: at 32 wide,
    0.02 leaves the blocks' output below bf16's resolution of the residual."""
    t = build("cpu", num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
              axes_dims_rope=(4, 6, 6))
    reinit(t, 0.3)
    return t


TINY_VARIANTS = {"fp8_cpu": dict(quantize="fp8", attention="native", compile="off")}
SECTIONS = ("plus_e2e", "kontext_vs_flux", "text_encoder_fp8", "cfg_step")


def main(names=tuple(VARIANTS), out_dir: str = "bench/results", build_fn=None, size: int = 1024, text: int = 300,
         tiny: bool = False, budget_s: float = 420.0, sections=SECTIONS) -> dict:
    """Each section in its own try; the JSON rewritten after each; a section starting past `budget_s`
    seconds is skipped and says so (the CFG-step variants check the budget between variants too)."""
    from bench import edit_e2e
    from bench.latency import versions
    from bench.output import save_json

    t_start = time.perf_counter()
    deadline = t_start + budget_s
    stem = "edit_e2e_tiny" if tiny else "edit_e2e"  # edit_<gpu>.json keeps the older CFG-step-only runs
    if tiny:
        names, build_fn, size, text = tuple(TINY_VARIANTS), build_fn or tiny_build, 64, 48
    res = {"versions": versions(), "budget_s": budget_s, "tiny": tiny,
           "weights": "random, of the real architectures" + (" (tiny configs: plumbing only)" if tiny else "")}
    save = lambda _=None: save_json(res, stem, out_dir)  # noqa: E731
    runs = {"plus_e2e": lambda: edit_e2e.plus_e2e(tiny, deadline),
            "kontext_vs_flux": lambda: edit_e2e.kontext_vs_flux(tiny),
            "text_encoder_fp8": lambda: edit_e2e.text_encoder_fp8(tiny),
            "cfg_step": lambda: cfg_variants(names, build_fn or build, size, text,
                                             lambda part: (res.__setitem__("cfg_step", part), save()), deadline,
                                             {**VARIANTS, **TINY_VARIANTS})}
    for name in sections:
        if time.perf_counter() > deadline:
            res[name] = {"skipped": f"past the {budget_s:g} s budget"}
        else:
            t0 = time.perf_counter()
            try:
                res[name] = runs[name]()
            except Exception as e:  # keep the other sections' figures
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            if isinstance(res[name], dict):
                res[name]["section_s"] = round(time.perf_counter() - t0, 1)
        edit_e2e.release()
        save()
        print("EDIT", name, str(res[name])[:2000], flush=True)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    return res
