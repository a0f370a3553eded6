"""`python -m bench video [--steps N] [--tiny]`: Wan 2.1 I2V 14B, stock diffusers vs this worker's recipe, in one
process (WanTransformer3DModel, 16.4B with the image K/V, random weights of the real architecture built
on the GPU; speed does not depend on the weight values).

One transformer is built once. Stock bf16 eager is timed first at 480p (832x480, 81 frames: 32,760
tokens) and at 720p (1280x720: 75,600 tokens); then the same module is turned into this worker's
recipe in place (app.optimize.apply_recipe: FP8 block linears with the family's skip list, fused
GELU+FP8, FA3, regional compile; what `choose_recipe` gives the wan-i2v family on an H200) and timed
at both sizes; then FA3's FP8 path (opt-in `ATTENTION=fa3_fp8`) at 480p. A CFG step is two forwards
(positive, negative) one after the other, as diffusers' Wan loop runs them; `--steps` timed steps
after one untimed warm step (stock 720p: one timed step, eager needs no warm-up). The relative error
is one positive forward of each variant against stock bf16 on the same inputs. Then the VAE decode
of 81 frames at 480p (random AutoencoderKLWan, bf16 as the worker loads it), MP4 encodes of its
output (noise-like: x264's worst case) and of a smooth synthetic clip, and the 4-step setting (4
steps, CFG 1: the distilled model's defaults) end to end through `Service.run` on the recipe's
transformer with random UMT5-XXL and CLIP ViT-H, MP4 included. A section that fails keeps the
others' figures; the JSON is rewritten after each; sections past `budget_s` are skipped and say so.
"""

from __future__ import annotations

import base64
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


def vae_and_mp4(holder, width: int, height: int, frames: int, tiny: bool) -> dict:
    from app.video import encode_mp4

    vae = holder.vae
    lat = torch.randn(1, vae.config.z_dim, (frames - 1) // 4 + 1, height // 8, width // 8,
                      device=vae.device, dtype=vae.dtype, generator=torch.Generator(vae.device.type).manual_seed(0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        first, video = timing.timed(lambda: family().decode(holder, lat, width, height))
        again, video = timing.timed(lambda: family().decode(holder, lat, width, height))
    out = dict(vae_decode_first_s=round(first, 2), vae_decode_s=round(again, 3),
               vae_decode_peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
               video_shape=list(video.shape))
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


def main(steps: int = 3, out_dir: str = "bench/results", tiny: bool = False, budget_s: float = 510.0) -> dict:
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
           "cfg": "two forwards per step, one after the other", "timed_steps": steps}
    if tiny:
        tiny_pipe = family().tiny_variant().build_tiny()
        reinit(tiny_pipe.transformer, 0.3)  # at 32 wide, 0.02 leaves the blocks' output below bf16's resolution
        holder = types.SimpleNamespace(transformer=tiny_pipe.transformer.to(torch.bfloat16), vae=tiny_pipe.vae)
    else:
        holder = types.SimpleNamespace(transformer=build(device), vae=None)
    t = holder.transformer
    res["params_B"] = round(sum(p.numel() for p in t.parameters()) / 1e9, 3)

    def section(name, fn):
        if time.perf_counter() - t_start > budget_s:
            res[name] = {"skipped": f"past the {budget_s:g} s budget"}
        else:
            try:
                res[name] = fn()
            except Exception as e:  # keep the other sections' figures
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        save_json(res, stem, out_dir)
        print("VIDEO", name, res[name], flush=True)

    inputs = {k: cfg_inputs(holder, w, h, frames) for k, (w, h) in sizes.items()}
    with torch.inference_mode():
        ref = t(**inputs["480p"][0])[0].float()
    section("stock_eager_480p", lambda: measure(t, *inputs["480p"], reps=steps))
    section("stock_eager_720p", lambda: measure(t, *inputs["720p"], reps=0, warm=0))

    def optimize():
        t0 = time.perf_counter()
        applied = apply_recipe(holder, family(), recipe(cuda))
        return dict(recipe=recipe(cuda).to_dict(), applied_ms=applied, apply_s=round(time.perf_counter() - t0, 2),
                    fp8_linears=sum(type(m).__name__ == "FP8Linear" for m in holder.transformer.modules()))

    section("recipe", optimize)
    t = holder.transformer

    def ours(size):
        out = measure(t, *inputs[size], reps=steps)
        if size == "480p":
            out["rel_err_vs_stock_bf16"] = rel_err(t, inputs["480p"][0], ref)
            out["vs_stock_eager"] = round(res["stock_eager_480p"]["cfg_step_s"] / out["cfg_step_s"], 2)
        return out

    section("ours_480p", lambda: ours("480p"))
    section("ours_720p", lambda: ours("720p"))
    inputs.pop("720p")
    if holder.vae is None:
        from diffusers import AutoencoderKLWan

        with torch.device(device):
            holder.vae = AutoencoderKLWan().to(torch.bfloat16).eval()
        reinit(holder.vae)
    w, h = sizes["480p"]
    section("vae_and_mp4_480p", lambda: vae_and_mp4(holder, w, h, frames, tiny))

    def e2e():
        pipe = tiny_pipe if tiny else full_pipeline(t, holder.vae, device)
        if tiny:
            pipe.transformer = t
        return end_to_end(pipe, w, h, frames, tiny)

    section("e2e_4step_480p", e2e)

    def fa3_fp8():
        used = set_attention(t, "fa3_fp8") if cuda else "native"
        torch._dynamo.reset()  # the compiled blocks were traced with the bf16 FA3 backend
        out = measure(t, *inputs["480p"], reps=steps)
        out.update(attention_used=used, rel_err_vs_stock_bf16=rel_err(t, inputs["480p"][0], ref))
        return out

    section("ours_fa3fp8_480p", fa3_fp8)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    save_json(res, stem, out_dir)
    return res
