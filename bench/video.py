"""`python -m bench video [--steps N] [--tiny]`: Wan 2.1 I2V 14B, stock diffusers vs this worker's recipe, in one
process (WanTransformer3DModel, 16.4B with the image K/V, random weights of the real architecture built
on the GPU; speed does not depend on the weight values).

The stock transformer is built once, gives the reference output (one positive forward at 480p, bf16
eager), and is turned into this worker's recipe in place (app.optimize.apply_recipe: FP8 block linears
with the family's skip list, fused GELU+FP8, FA3, regional compile; what `choose_recipe` gives the
wan-i2v family on an H200). The sections then run in the order of what issue 17's goals need, since
the budget may cut the end: ours at 480p (CFG step, peak VRAM, FP8 vs bf16 relative error); the 4-step
setting (4 steps, CFG 1: a baked distill's defaults) end to end through `Service.run` with random
UMT5-XXL and CLIP ViT-H, MP4 included (peak VRAM of the timed job); the VAE decode of 81 frames at 480p
untiled and tiled (random AutoencoderKLWan, bf16) and MP4 encodes of its noise-like output (x264's worst
case) and of a smooth synthetic clip; ours at 720p; FA3's FP8 path (opt-in `ATTENTION=fa3_fp8`) at
480p; then, with ours freed, stock bf16 eager rebuilt (same seed) at 480p and 720p. A CFG step is two
forwards (positive, negative) one after the other, as diffusers' Wan loop runs them; `--steps` timed
steps after one untimed warm step (720p: one timed step after the first). Every section resets the
peak-memory counter, records an exception (an OOM) as its error and frees what it left; the JSON,
with a `goals` summary, is rewritten after each; a section whose rough H200 estimate would pass
`budget_s` is skipped and says so.
"""

from __future__ import annotations

import base64
import gc
import io
import tempfile
import time
import types

import torch

from bench import timing
from bench.models import reinit

# Wan2.1-I2V-14B's transformer config (480P and 720P checkpoints alike); the rest are diffusers' defaults,
# which are the published 14B values (40 layers, 40 heads of 128, FFN 13824, text 4096).
I2V_14B = dict(image_dim=1280, added_kv_proj_dim=5120, in_channels=36, out_channels=16)
SIZES = {"480p": (832, 480), "720p": (1280, 720)}
TINY_SIZES = {"480p": (64, 48), "720p": (96, 64)}
FRAMES, TINY_FRAMES = 81, 9


def family():
    from app.families import FAMILIES

    return FAMILIES["wan-i2v"]


def recipe(cuda: bool):
    """The worker's recipe for wan-i2v on an H200 (CPU: FP8's reference path, eager, native attention)."""
    from app.optimize import Recipe

    if cuda:
        return Recipe(fuse_qkv=family().fuse_qkv, quantize="fp8", attention="fa3", compile="regional",
                      cuda_graphs=family().cuda_graphs, fuse_gelu_quant=True)
    return Recipe(quantize="fp8", fuse_gelu_quant=True)


def build(device: str = "cuda", **config):
    """The I2V 14B transformer (its published config unless `config` narrows it), random, bf16."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        t = WanTransformer3DModel(**(config or I2V_14B)).to(torch.bfloat16)
    reinit(t)
    return t.eval()


def cfg_inputs(holder, width: int, height: int, frames: int):
    """(positive, negative) forwards' keyword arguments: the same latents and image tokens, two prompts."""
    fam = family()
    pos = fam.denoiser_inputs(holder, width, height, seed=0, frames=frames)
    neg = dict(pos, encoder_hidden_states=fam.denoiser_inputs(holder, width, height, seed=1,
                                                              frames=frames)["encoder_hidden_states"])
    return pos, neg


def cfg_step(t, pos, neg):
    with torch.inference_mode():
        return t(**pos)[0], t(**neg)[0]


def measure(t, pos, neg, reps: int, warm: int = 1) -> dict:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first, _ = timing.timed(lambda: cfg_step(t, pos, neg))
    for _ in range(warm):
        timing.timed(lambda: cfg_step(t, pos, neg))
    times = [first] if reps == 0 else [timing.timed(lambda: cfg_step(t, pos, neg))[0] for _ in range(reps)]
    return dict(first_call_s=round(first, 2), cfg_step_s=timing.med(times), timed_steps=max(reps, 1),
                all_s=[round(x, 4) for x in times],
                peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)


def rel_err(t, pos, ref) -> float:
    with torch.inference_mode():
        got = t(**pos)[0].float()
    return round(((got - ref).norm() / ref.norm()).item(), 5)


def frames_uint8(video) -> "object":
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], as the pipeline's postprocess rounds them."""
    v = ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)
    return (v * 255).round().to(torch.uint8).cpu().numpy()


def synthetic_clip(width: int, height: int, frames: int):
    """A smooth test card panning one pixel a frame: what a generated product shot compresses like."""
    import numpy as np

    from app.families.base import synthetic_image

    card = np.asarray(synthetic_image(width + frames, height))
    return np.stack([card[:, i:i + width] for i in range(frames)])


def random_vae(device: str):
    """Wan 2.1's AutoencoderKLWan (diffusers' defaults are its config), random, bf16 as the worker loads it."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    reinit(vae)
    return vae


def decode(holder, lat, width: int, height: int, tiled: bool) -> dict:
    """Two decodes of `lat` (the first pays cuDNN's algorithm search), the second timed, with its peak."""
    vae = holder.vae
    vae.enable_tiling() if tiled else vae.disable_tiling()
    free()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.inference_mode():
            first, video = timing.timed(lambda: family().decode(holder, lat, width, height))
            again, video = timing.timed(lambda: family().decode(holder, lat, width, height))
    finally:
        vae.disable_tiling()
    return dict(first_s=round(first, 2), decode_s=round(again, 3), peak_GiB=peak_gib()), video


def vae_and_mp4(holder, width: int, height: int, frames: int, tiny: bool) -> dict:
    from app.video import encode_mp4

    vae = holder.vae
    lat = torch.randn(1, vae.config.z_dim, (frames - 1) // 4 + 1, height // 8, width // 8,
                      device=vae.device, dtype=vae.dtype, generator=torch.Generator(vae.device.type).manual_seed(0))
    out = {"video_shape": None}
    for tiled in (False, True):  # untiled may OOM on a smaller GPU: its error is kept, the tiled figure still comes
        try:
            figures, video = decode(holder, lat, width, height, tiled)
            out["tiled" if tiled else "untiled"] = figures
            out["video_shape"] = list(video.shape)
        except Exception as e:
            out["tiled" if tiled else "untiled"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            free()
    if out["video_shape"] is None:
        return out
    noise = frames_uint8(video)
    del video
    secs, blob = timing.timed(lambda: encode_mp4(noise, 16, 90))
    out.update(mp4_encode_vae_output_s=round(secs, 3), mp4_vae_output_bytes=len(blob))
    smooth = synthetic_clip(width, height, frames)
    secs, blob = timing.timed(lambda: encode_mp4(smooth, 16, 90))
    out.update(mp4_encode_synthetic_s=round(secs, 3), mp4_synthetic_bytes=len(blob))
    return out


def full_pipeline(t, vae, device: str):
    """WanImageToVideoPipeline around `t` and `vae`: random UMT5-XXL and CLIP ViT-H/14 (the published shapes),
    a word-level tokenizer made in code (ids within UMT5's vocabulary), CLIP's default 224 preprocessing."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, \
        UMT5EncoderModel

    from app.families.wan_i2v import PROMPT_TOKENS
    from app.tiny import tokenizer

    with torch.device(device):
        umt5 = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                           num_heads=64, feed_forward_proj="gated-gelu")).to(torch.bfloat16)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
            patch_size=14, projection_dim=1024, hidden_act="gelu")).to(torch.bfloat16)
    for m in (umt5, clip):
        reinit(m)
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer(PROMPT_TOKENS), text_encoder=umt5.eval(), vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                   image_processor=CLIPImageProcessor(), image_encoder=clip.eval(), transformer=t)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def end_to_end(pipe, width: int, height: int, frames: int, tiny: bool) -> dict:
    """The 4-step setting (4 steps, guidance 1: no CFG pass) through Service.run, MP4 included: one
    warm-up job, then the timed one."""
    from dataclasses import replace

    from app.config import Settings
    from app.families.base import synthetic_image
    from app.service import Service
    from app.source import ModelSource
    from app.storage import open_store
    from preflight import Plan

    cuda = torch.cuda.is_available()
    fam = family().tiny_variant() if tiny else family()
    fam = replace(fam, defaults=replace(fam.defaults, steps=4, guidance=1.0))  # a baked distill's defaults
    out_dir = tempfile.mkdtemp(prefix="bench-video-")
    settings = Settings(model="bench-wan-i2v", output_uri=out_dir, preflight=False, warmup=False,
                        device="cuda" if cuda else "cpu")
    plan = Plan(device="cuda" if cuda else "cpu", precision="fp8" if cuda else "fp32",
                capability=torch.cuda.get_device_capability(0) if cuda else None,
                gpu_name=torch.cuda.get_device_name(0) if cuda else "cpu")
    svc = Service(pipe, ModelSource(kind="hub", id="Wan2.1-I2V-14B shape, random weights", family=fam), settings,
                  plan, open_store(out_dir), {})
    buf = io.BytesIO()
    synthetic_image(width, height).save(buf, "PNG")
    job = {"prompt": "the sneaker turns slowly on a white table", "image": "data:image/png;base64,"
           + base64.b64encode(buf.getvalue()).decode(), "num_frames": frames, "seed": 0}
    warm = svc.run(job, "bench-warm")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = svc.run(job, "bench-e2e")
    if "error" in res or "error" in warm:
        return {"error": str(res.get("error") or warm.get("error"))[:400]}
    video = res["videos"][0]
    return dict(total_s=round(res["timings"]["total_ms"] / 1000, 2), timings_ms=res["timings"],
                warmup_total_s=round(warm["timings"]["total_ms"] / 1000, 2),
                size=f"{video['width']}x{video['height']}", frames=video["frames"], mp4_bytes=video["bytes"],
                steps=4, guidance_scale=1.0,
                peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def free() -> None:
    """Drop what a finished (or failed: an OOM's tensors) section left, so the next starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def goals(res: dict) -> dict:
    """Issue 17's H200 goals against what has been measured so far (None: not measured)."""
    ours, e2e = res.get("ours_480p", {}), res.get("e2e_4step_480p", {})
    fp8 = res.get("ours_fa3fp8_480p", {})
    steps = [x for x in (ours.get("cfg_step_s"), fp8.get("cfg_step_s")) if x]
    peaks = [x for x in (ours.get("peak_GiB"), e2e.get("peak_GiB")) if x]
    ok = lambda v, limit: None if v is None else v <= limit  # noqa: E731
    return {"cfg_step_480p_s<=4.0": ok(min(steps) if steps else None, 4.0),
            "e2e_4step_480p_s<=14": ok(e2e.get("total_s"), 14.0),
            "peak_480p_GiB<=40": ok(max(peaks) if peaks else None, 40.0)}


def main(steps: int = 3, out_dir: str = "bench/results", tiny: bool = False, budget_s: float = 520.0) -> dict:
    """Sections in the order of what the goals need (ours at 480p, the 4-step job end to end, peak VRAM),
    then VAE/MP4, 720p, FA3's FP8 path, and stock last (rebuilt once ours is freed, so each section's
    peak is its own); a section is skipped when its rough H200 estimate would run past `budget_s`."""
    from app.optimize import apply_recipe
    from app.attention import set_attention
    from bench.latency import versions
    from bench.output import save_json

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sizes, frames = (TINY_SIZES, TINY_FRAMES) if tiny else (SIZES, FRAMES)
    stem = "video_tiny" if tiny else "video"
    res = {"versions": versions(), "model": "WanTransformer3DModel, Wan2.1-I2V-14B config, random weights"
           + (" (tiny)" if tiny else ""), "frames": frames, "sizes": {k: f"{w}x{h}" for k, (w, h) in sizes.items()},
           "cfg": "two forwards per step, one after the other", "timed_steps": steps, "budget_s": budget_s}

    def build_stock():
        if tiny:
            pipe = family().tiny_variant().build_tiny()
            reinit(pipe.transformer, 0.3)  # at 32 wide, 0.02 leaves the blocks' output below bf16's resolution
            return pipe.transformer.to(torch.bfloat16), pipe
        return build(device), None

    stock, tiny_pipe = build_stock()
    holder = types.SimpleNamespace(transformer=stock, vae=tiny_pipe.vae if tiny else None)
    res["params_B"] = round(sum(p.numel() for p in stock.parameters()) / 1e9, 3)
    res["build_s"] = round(time.perf_counter() - t_start, 1)
    del stock

    def section(name, fn, est_s: float = 0.0):
        """Run fn into res[name]; an exception (an OOM) is recorded and its memory freed for the next."""
        elapsed = time.perf_counter() - t_start
        if not tiny and elapsed + est_s > budget_s:
            res[name] = {"skipped": f"at {elapsed:.0f} s, ~{est_s:.0f} s more would pass the {budget_s:g} s budget"}
        else:
            t0 = time.perf_counter()
            try:
                res[name] = fn()
            except Exception as e:  # keep the other sections' figures
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            res[name]["section_s"] = round(time.perf_counter() - t0, 1)
        free()
        res["goals"] = goals(res)
        res["wall_s"] = round(time.perf_counter() - t_start, 1)
        save_json(res, stem, out_dir)
        print("VIDEO", name, res[name], flush=True)

    inputs = {k: cfg_inputs(holder, w, h, frames) for k, (w, h) in sizes.items()}
    with torch.inference_mode():  # stock bf16's output: the reference of every FP8 relative error
        ref = holder.transformer(**inputs["480p"][0])[0].float()

    def optimize():
        t0 = time.perf_counter()
        applied = apply_recipe(holder, family(), recipe(cuda))
        free()  # the bf16 weights the FP8 copies replaced
        return dict(recipe=recipe(cuda).to_dict(), applied_ms=applied, apply_s=round(time.perf_counter() - t0, 2),
                    fp8_linears=sum(type(m).__name__ == "FP8Linear" for m in holder.transformer.modules()),
                    resident_GiB=round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None)

    section("recipe", optimize)

    def ours(size, reps, warm=1):
        out = measure(holder.transformer, *inputs[size], reps=reps, warm=warm)
        if size == "480p":
            out["rel_err_vs_stock_bf16"] = rel_err(holder.transformer, inputs["480p"][0], ref)
        return out

    section("ours_480p", lambda: ours("480p", steps), est_s=120)
    w, h = sizes["480p"]

    def e2e():
        if holder.vae is None:
            holder.vae = random_vae(device)
        if tiny:
            pipe = tiny_pipe
            pipe.transformer = holder.transformer
        else:
            pipe = full_pipeline(holder.transformer, holder.vae, device)
        return end_to_end(pipe, w, h, frames, tiny)

    section("e2e_4step_480p", e2e, est_s=90)
    tiny_pipe = None  # the tiny pipeline's text and image encoders are no longer needed

    def vae():
        if holder.vae is None:
            holder.vae = random_vae(device)
        return vae_and_mp4(holder, w, h, frames, tiny)

    section("vae_and_mp4_480p", vae, est_s=40)
    # 720p: a new shape recompiles the regional blocks (dynamic after the first shape, as the worker's
    # second warm-up bucket does); one timed step after the compiling one
    section("ours_720p", lambda: ours("720p", 1 if cuda else steps, warm=0), est_s=150)

    def fa3_fp8():
        used = set_attention(holder.transformer, "fa3_fp8") if cuda else "native"
        torch._dynamo.reset()  # the compiled blocks were traced with the bf16 FA3 backend
        out = measure(holder.transformer, *inputs["480p"], reps=steps)
        out.update(attention_used=used, rel_err_vs_stock_bf16=rel_err(holder.transformer, inputs["480p"][0], ref))
        return out

    section("ours_fa3fp8_480p", fa3_fp8, est_s=130)
    holder.transformer = holder.vae = None
    torch._dynamo.reset()
    free()

    def stock(size, reps):
        if holder.transformer is None:
            holder.transformer = build_stock()[0]
        out = measure(holder.transformer, *inputs[size], reps=reps, warm=1 if reps else 0)
        if size == "480p":
            out["ours_speedup"] = {k: round(out["cfg_step_s"] / res[k]["cfg_step_s"], 2)
                                   for k in ("ours_480p", "ours_fa3fp8_480p") if "cfg_step_s" in res.get(k, {})}
        return out

    section("stock_eager_480p", lambda: stock("480p", steps), est_s=80)
    section("stock_eager_720p", lambda: stock("720p", 0), est_s=45)  # one eager step (no warm-up needed)
    return res
