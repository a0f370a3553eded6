"""python -m bench warmpath: what a warm FLUX worker can still shed, side by side in one process.

FLUX.1-dev shape with random weights (`--tiny`: the embedded tiny model uncompiled, plumbing only;
tests/test_step_cache.py runs the hooks around compiled blocks on the CPU), the worker's FP8 recipe
applied and warmed, then: opt-in step caches (app.step_cache, hooks around the regionally compiled
blocks) - denoise time, speed-up, the graphs each setting compiled (first run, then later runs: 0
means no recompile) and the relative L2 of the final latents against the uncached run, same seed;
the text-embedding cache
(app.text_cache, as a job reaches it) - a miss (the encoders) against a hit (lookup and copy to the GPU); T5 prompt-length buckets - the denoise time
at 128/256/384/512 tokens and the latents' deviation against 512 (the length FLUX.1-dev was
trained with). The first call of each setting is reported apart (a recompile shows there).
"""

from __future__ import annotations

import torch

from app.families.flux import FAMILY as FLUX
from app.optimize import apply_recipe, graphs_compiled
from app.step_cache import FBCACHE_THRESHOLD, MAGCACHE_THRESHOLD, step_cache
from app.text_cache import TextCache, TextEncoding, TextKey, nbytes
from bench import timing

CACHES = ("fbcache", "taylorseer", "magcache")
BUCKETS = (128, 256, 384, 512)


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return round(((a - b).norm() / b.norm()).item(), 5)


def _latents(pipe, emb, kw):
    g = torch.Generator(pipe.device.type).manual_seed(0)
    return pipe(**emb, **kw, generator=g, output_type="latent").images


def _timed_runs(fn, reps):
    first, out = timing.timed(fn)
    rest = [timing.timed(fn)[0] for _ in range(reps)]
    return round(first, 3), timing.med(rest), out


def _counted(fn):
    """fn() and the graphs Dynamo compiled while it ran."""
    before = graphs_compiled()
    out = fn()
    return out, graphs_compiled() - before


def run(pipe, family, size: int, steps: int, reps: int = 3, caches=CACHES, buckets=BUCKETS) -> dict:
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=family.defaults.guidance)
    res: dict = {"size": size, "steps": steps}
    full = family.defaults.max_sequence_length
    with torch.inference_mode():
        # the text-embedding cache as a job reaches it (TextEncoding): a miss runs CLIP + T5 and keeps a
        # pinned host copy, a hit is the lookup plus the copy back to the GPU
        text = TextEncoding(TextCache(64 << 20), "bench")
        key = TextKey("", family.name, timing.PROMPT, None, full)
        miss = [timing.timed(lambda: family.encode(pipe, timing.PROMPT))[0] for _ in range(reps)]
        emb = text.embeddings(key, lambda: family.encode(pipe, timing.PROMPT), pipe._execution_device)
        hit = [timing.timed(lambda: text.embeddings(key, None, pipe._execution_device))[0] for _ in range(reps)]
        res["text_cache"] = dict(miss_ms=round(1000 * timing.med(miss), 2), hit_ms=round(1000 * timing.med(hit), 4),
                                 entry_mib=round(nbytes(emb) / 2**20, 2))
        first, base_s, base = _timed_runs(lambda: _latents(pipe, emb, kw), reps)
        res["uncached"] = dict(first_s=first, denoise_s=base_s)
        res["thresholds"] = dict(fbcache=FBCACHE_THRESHOLD, magcache=MAGCACHE_THRESHOLD,
                                 taylorseer="cache_interval=5, disable_cache_before_step=3, max_order=1")
        for name in caches:
            with step_cache(getattr(pipe, family.denoiser), name, steps, family.magcache_ratios()):
                try:
                    (first, _), first_graphs = _counted(lambda: timing.timed(lambda: _latents(pipe, emb, kw)))
                    times, later_graphs = _counted(lambda: [timing.timed(lambda: _latents(pipe, emb, kw))
                                                            for _ in range(reps)])
                    s, lat = timing.med([t for t, _ in times]), times[-1][1]
                    res[name] = dict(first_s=round(first, 3), denoise_s=s, speedup=round(base_s / s, 2),
                                     graphs_first=first_graphs, graphs_later=later_graphs,
                                     deterministic=all(torch.equal(o, lat) for _, o in times),  # same seed
                                     rel_l2_vs_uncached=_rel(lat, base))
                except Exception as e:  # a cache that does not combine with the compiled recipe
                    res[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        res["buckets"] = {}
        ref = None
        for length in sorted(buckets, reverse=True):
            pe, ppe, _ = pipe.encode_prompt(prompt=timing.PROMPT, prompt_2=None, max_sequence_length=length)
            e = dict(prompt_embeds=pe, pooled_prompt_embeds=ppe)
            first, s, lat = _timed_runs(lambda: _latents(pipe, e, kw), reps)
            ref = lat if ref is None else ref
            res["buckets"][length] = dict(first_s=first, denoise_s=s, rel_l2_vs_longest=_rel(lat, ref))
    return res


def main(tiny: bool = False, size: int = 1024, steps: int | None = None, out_dir: str = "bench/results") -> dict:
    from bench.latency import _recipe, versions
    from bench.output import save_json

    if tiny:
        pipe, family = FLUX.build_tiny(), FLUX.tiny_variant()
        buckets = (16, 32, 64)
    else:
        from bench.models import FULL_SIZE

        pipe, family, buckets = FULL_SIZE["flux"](), FLUX, BUCKETS
    pipe.set_progress_bar_config(disable=True)
    # each bucket and cache hook is a new shape or graph for Dynamo: room for all of them (on CPU, no
    # compile: the tiny run checks the plumbing, and CPU Inductor compiles take minutes)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    recipe = _recipe("flux", "off" if tiny else "regional", "fa3", None, True)
    res = {"versions": versions(), "recipe": recipe.to_dict(), "apply_ms": apply_recipe(pipe, family, recipe)}
    timing.warm(pipe, family, size)
    res.update(run(pipe, family, size, steps or family.defaults.steps, reps=2 if tiny else 3, buckets=buckets))
    save_json(res, "warmpath", out_dir)
    return res
