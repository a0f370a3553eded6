"""`python -m bench capped`: FLUX.1-dev and Qwen-Image-Edit-Plus on a simulated 24 GB card, through the
worker's real Service path, each beside its uncapped run; then INT8 against bf16 for the FLUX denoiser.

    python -m bench capped               # GPU: random weights of the real architectures, 1024x1024
    python -m bench capped --budget 540  # skip the later sections once this many seconds are spent
    python -m bench capped --tiny        # CPU: the tiny pipelines (plumbing only; the capped plans forced)

Sections, in this order (the JSON is rewritten after each, so a run cut short keeps what it finished):

  flux          uncapped: `Service.load` (preflight, memory plan, recipe: FP8 + regional compile, warm-up)
                around a full-size random-weight pipeline built on the GPU (bench.models); a warm job,
                a measured job (28 steps), one job with each phase's peak (`job_phases`), the phases
                alone (`phase_peaks`, tiled decode too), then the text encoders in FP8 (`text_fp8`: their
                error, and the resident peak with them, whole and tiled decode).
                capped: a fresh pipeline with the same weights in host memory, then
                `torch.cuda.set_per_process_memory_fraction` leaves `--cap-gib` (23.5: a 4090's free
                memory) usable; preflight sees the cap (preflight.gpu.usable_bytes) and picks the plan
                (auto); the same jobs.
  qwen          Qwen-Image-Edit-Plus (20.4B transformer, Qwen2.5-VL 7B, its VAE; random weights) with one
                1024x1024 reference: uncapped, then capped with the uncapped run's FP8 weights moved to
                host memory (what a baked FP8 load gives a 24 GB card). Jobs: the 4-step setting (no CFG)
                warm and measured, then 2 and 3 steps with true CFG 4: their difference is the CFG step,
                from which the model card's 40-step job is extrapolated (`cfg40_estimate_s`).
  modfp8        the FLUX.1-dev transformer alone, eager: bf16, the FP8 recipe, then its modulation linears
                (kept bf16 by the skip list: 6 GiB of the FP8 denoiser's 14.2) in FP8 too: weight GiB, forward
                time, error against bf16 (the lever left for a resident FLUX under 22 GiB).
  int8          the FLUX.1-dev transformer alone, bf16 vs torchao INT8 dynamic (what Ampere gets), both
                fused and regionally compiled, SDPA attention: forward time, peak, relative error, and
                the GEMM kernels the profiler saw (`int8_kernels`: torchao's path really ran).

Each section's cost is estimated up front (`SECTION_S`); one that does not fit in what is left of
`--budget` is recorded as skipped. Reported per run: job seconds, peak GiB, the plan, capped/uncapped
(goals: FLUX at most 1.15, Qwen's 4-step job at most 3), and an ESTIMATED RTX 4090 time: the uncapped H200
time scaled by bench.cost's ratios (FP8 dense tensor throughput 1979 vs 330.3 TFLOPS, bandwidth 4800 vs
1008 GB/s, 80/20), plus the capped plan's host->device copies at the 4090's PCIe Gen4 rate (bench.cost's
model; copies that streams overlap with compute are counted in full). It is an estimate, not a 4090
measurement.

Where each goal's figure is in the JSON:

  FLUX capped at most 1.15x uncapped    flux.capped_over_uncapped (flux.{uncapped,capped}.measured)
  Qwen 4-step capped at most 3x         qwen.capped_over_uncapped; 40 CFG steps: qwen.{uncapped,capped}.cfg40_estimate_s
  FLUX resident peak at most 22 GiB     flux.uncapped.measured.peak_GiB (bf16 text encoders);
                                        flux.text_fp8.job.peak_GiB, flux.text_fp8.job_tiled_512.peak_GiB (FP8 ones);
                                        modfp8.fp8_modulation_too.weights_GiB (the denoiser with FP8 modulations)
  INT8 faster than bf16                 int8.int8_over_bf16, int8.int8_faster, int8.int8.int8_kernels
  RTX 4090 (ESTIMATES)                  flux.rtx4090_estimate, qwen.rtx4090_estimate, qwen.rtx4090_estimate_cfg40
  peaks per phase                       {flux,qwen}.{uncapped,capped}.job_phases, flux.uncapped.phase_peaks

Results: capped_<gpu>.json in bench/results (and $OUT). Exit 1 when a run failed.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import io
import tempfile
import time
from pathlib import Path

GIB = 2**30
PROMPT = "a lighthouse on a cliff at dusk, film photograph"
EDIT_PROMPT = "make it a rainy night, keep the lighthouse"
# Seconds a section takes on an H200 (the runs of 2026-12-02, rounded up): skipped when less is left.
SECTION_S = {"flux": 260, "qwen": 200, "modfp8": 45, "int8": 90}
# The text encoders run FP8 (TEXT_ENCODERS=fp8) only where the denoised latents they lead to stay within
# this relative L2 distance of the bf16 encoders' (the FP8 denoiser's own distance is of this order).
TEXT_FP8_BOUND = 0.05


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def cap_memory(cap_gib: float) -> dict:
    """Leave `cap_gib` usable: the per-process fraction (preflight reads it back), or, on a torch without
    the getter preflight needs, a ballast tensor holding the rest of the free memory."""
    import torch

    from preflight.gpu import usable_bytes

    free, total = torch.cuda.mem_get_info(0)
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        torch.cuda.set_per_process_memory_fraction((cap_gib * GIB + torch.cuda.memory_reserved(0)) / total, 0)
        return {"method": "set_per_process_memory_fraction", "usable_gib": _gib(usable_bytes(torch, free, total)),
                "reserved_before_gib": _gib(torch.cuda.memory_reserved(0))}
    ballast = torch.empty(max(0, int(free - cap_gib * GIB)), dtype=torch.uint8, device="cuda")
    return {"method": "ballast", "ballast": ballast, "ballast_gib": _gib(ballast.numel()),
            "usable_gib": _gib(torch.cuda.mem_get_info(0)[0])}


def uncap() -> None:
    import torch

    if torch.cuda.is_available() and hasattr(torch.cuda, "set_per_process_memory_fraction"):
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


# -- the models ---------------------------------------------------------------------------------------------
def build_qwen_edit_plus(device: str = "cuda"):
    """Qwen-Image-Edit-Plus shape, random weights: the 20.4B transformer (bench.edit.build), Qwen2.5-VL 7B
    (its published text and vision sizes) and Qwen-Image's VAE; the family's word-level tokenizer, and
    Qwen2-VL's processor at its own pixel limits (the pipeline hands it a 384x384 condition image)."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

    from app.families.qwen_image_edit import _absent_video_processor_allowed, _tiny_tokenizer
    from bench.edit import build as build_transformer
    from bench.models import reinit

    tokenizer = _tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    transformer = build_transformer(device)
    torch.manual_seed(1)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                         rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    with torch.device(device):
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
        vae = AutoencoderKLQwenImage().to(torch.bfloat16)
    reinit(text_encoder)
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    with _absent_video_processor_allowed():
        processor = Qwen2VLProcessor(image_processor=cls(patch_size=14, merge_size=2, temporal_patch_size=2),
                                     tokenizer=tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    pipe = diffusers.QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(),
                                               tokenizer=tokenizer, processor=processor, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model(name: str, tiny: bool):
    """(ModelSource, build) of a family: its tiny pipeline, or the full-size random-weight one on the GPU."""
    from app.families import FAMILIES
    from app.source import ModelSource

    family = FAMILIES[name]
    if tiny:
        return ModelSource("tiny", f"tiny-{name}", family.tiny_variant()), family.build_tiny
    if name == "flux":
        from bench.models import build_flux_dev

        return ModelSource("hub", "flux-dev-shape-random", family), lambda: build_flux_dev("cuda")
    return ModelSource("hub", f"{name}-shape-random", family), lambda: build_qwen_edit_plus("cuda")


def image_ref(size: int) -> str:
    """A data: URI of the family's synthetic test card at `size` (JPEG: a small request body)."""
    from app.families.base import synthetic_image

    buf = io.BytesIO()
    synthetic_image(size, size).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# -- measuring ------------------------------------------------------------------------------------------------
def run_service(source, pipe, settings, jobs: list[dict], ballast_gib: float = 0.0, measured: int = -1):
    """Service.load around `pipe` (placed by the plan), then the jobs; `jobs[measured]` is the measured one."""
    import torch

    from app.memory import load_device
    from app.service import Service
    from app.storage import LocalStore

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    service = Service.load(settings, LocalStore(settings.output_uri), source=source,
                           loader=lambda src, plan, cache_dir: pipe.to(load_device(plan)))
    out = {"load_s": round(time.perf_counter() - t0, 1), "plan": service.plan.to_dict(), "jobs": []}
    if cuda:
        out["resident_GiB"] = _gib(torch.cuda.memory_allocated() - ballast_gib * GIB)
    for i, job in enumerate(jobs):
        _release()
        _sync()
        t = time.perf_counter()
        res = service.run(job, f"capped-{i}")
        _sync()
        rec = {"steps": job["num_inference_steps"], "guidance": job.get("guidance_scale"),
               "wall_s": round(time.perf_counter() - t, 3), "ok": "images" in res}
        rec.update(res.get("timings", {}) if rec["ok"] else {"error": res.get("error")})
        if rec["ok"]:  # the image's bytes: an offloaded plan runs the same kernels on the same weights
            image = Path(settings.output_uri, res["images"][0]["key"]).read_bytes()
            rec["sha256"] = hashlib.sha256(image).hexdigest()[:16]
        if cuda:
            rec["peak_GiB"] = round(torch.cuda.max_memory_allocated() / GIB - ballast_gib, 2)
            rec["allocated_GiB"] = round(torch.cuda.memory_allocated() / GIB - ballast_gib, 2)
        if res.get("cold_start"):
            out["cold_start"] = res["cold_start"]
        out["jobs"].append(rec)
    out["measured"] = out["jobs"][measured]
    return out, service


def job_phases(service, job: dict) -> dict:
    """One more job, each phase's peak GiB above what was allocated when it began: prompt encoding,
    each denoiser forward (the largest), the VAE's encode (a reference image) and decode."""
    import torch

    if not torch.cuda.is_available():
        return {}
    pipe, family = service.pipe, service.family
    rec: dict[str, float] = {}
    base: dict[str, int] = {}

    def enter(name):
        _sync()
        base[name] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def leave(name):
        _sync()
        rec[name] = max(rec.get(name, 0.0), _gib(torch.cuda.max_memory_allocated() - base[name]))

    def wrap(owner, attr, name):
        fn = getattr(owner, attr)

        def wrapped(*a, **k):
            enter(name)
            try:
                return fn(*a, **k)
            finally:
                leave(name)
        setattr(owner, attr, wrapped)
        return lambda: owner.__dict__.pop(attr, None)

    undo = [wrap(pipe, "encode_prompt", "encode_prompt_GiB"), wrap(pipe.vae, "decode", "vae_decode_GiB"),
            wrap(pipe.vae, "encode", "vae_encode_GiB")]
    den = getattr(pipe, family.denoiser)
    hooks = [den.register_forward_pre_hook(lambda m, a: enter("denoiser_forward_GiB")),
             den.register_forward_hook(lambda m, a, o: leave("denoiser_forward_GiB"))]
    _release()
    resident = torch.cuda.memory_allocated()
    try:
        res = service.run(job, "phases")
    except Exception as e:  # a figure less, not a section lost
        return _error(e)
    finally:
        for u in undo:
            u()
        for h in hooks:
            h.remove()
    return {"resident_GiB": _gib(resident), **rec, "ok": "images" in res}


def phase_peaks(service, size: int, steps: int) -> dict:
    """FLUX: peak GiB above what is resident of each phase alone: encode, denoise, decode, tiled decode."""
    import torch

    if not torch.cuda.is_available():
        return {}
    pipe, family = service.pipe, service.family
    out = {"resident_GiB": _gib(torch.cuda.memory_allocated())}

    def peak(name, fn):
        _release()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            r = fn()
        _sync()
        out[f"{name}_GiB"] = _gib(torch.cuda.max_memory_allocated() - base)
        return r

    emb = peak("encode", lambda: family.encode(pipe, PROMPT))
    lat = peak("denoise", lambda: pipe(**emb, height=size, width=size, num_inference_steps=steps,
                                       guidance_scale=family.defaults.guidance, output_type="latent").images)
    peak("decode", lambda: family.decode(pipe, lat, size, size))
    vae = pipe.vae
    vae.enable_tiling()
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 512 // pipe.vae_scale_factor
    try:
        peak("decode_tiled_512", lambda: family.decode(pipe, lat, size, size))
    finally:
        vae.disable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    return out


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return round(((a - b).norm() / b.norm().clamp(min=1e-12)).item(), 5)


def text_fp8(service, job: dict, size: int, steps: int) -> dict:
    """FLUX's text encoders swapped to FP8 in place (weights.quantize.quantize_text_encoder, what
    TEXT_ENCODERS=fp8 loads): their output error and that of the denoised latents they lead to (same seed),
    then the resident plan's job peak with them, with a whole and a tiled decode."""
    import torch

    from app import memory
    from weights.quantize import quantize_text_encoder

    pipe, family = service.pipe, service.family
    dev = getattr(pipe, family.denoiser).device

    def encode_and_denoise():
        with torch.inference_mode():
            emb = family.encode(pipe, PROMPT)
            lat = pipe(**emb, height=size, width=size, num_inference_steps=steps, output_type="latent",
                       guidance_scale=family.defaults.guidance,
                       generator=torch.Generator(dev.type).manual_seed(0)).images
        return emb, lat

    emb16, lat16 = encode_and_denoise()
    swapped = {n: len(quantize_text_encoder(m, "fp8")) for n, m in memory.text_encoders(pipe).items()}
    _release()
    emb8, lat8 = encode_and_denoise()
    out = {"swapped_linears": swapped, "rel_err": {k: _rel(emb8[k], emb16[k]) for k in emb16},
           "latents_rel_err": _rel(lat8, lat16), "bound": TEXT_FP8_BOUND}
    out["within_bound"] = out["latents_rel_err"] <= TEXT_FP8_BOUND
    del emb16, lat16, emb8, lat8
    if not torch.cuda.is_available():
        return out
    _release()
    out["resident_GiB"] = _gib(torch.cuda.memory_allocated())
    vae = pipe.vae
    for name, tiled in (("job", False), ("job_tiled_512", True)):
        if tiled:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = memory.TILE_PX, memory.TILE_PX // pipe.vae_scale_factor
        _release()
        t = time.perf_counter()
        res = service.run(job, f"text-fp8-{name}")
        _sync()
        out[name] = {"ok": "images" in res, "wall_s": round(time.perf_counter() - t, 3),
                     "peak_GiB": _gib(torch.cuda.max_memory_allocated())}
    vae.disable_tiling()
    return out


def estimate_4090(uncapped_s: float, plan: str, table: dict, forwards: int) -> dict:
    """The RTX 4090 time the uncapped H200 time suggests (bench.cost's ratios) under the capped plan: an
    estimate."""
    from bench.cost import CARDS, COMPUTE_SHARE, offload_s

    h200, rtx = (next(c for c in CARDS if c.name == n) for n in ("H200", "RTX 4090"))
    scale = COMPUTE_SHARE * h200.tensor_tflops["fp8"] / rtx.tensor_tflops["fp8"] + \
        (1 - COMPUTE_SHARE) * h200.bandwidth_gbs / rtx.bandwidth_gbs
    copies = offload_s(plan, table, forwards, rtx)
    return {"seconds": round(uncapped_s * scale + copies, 2), "is": "estimate", "scale": round(scale, 2),
            "copies_s": round(copies, 2), "plan": plan,
            "method": "bench/cost.py: uncapped H200 time x (0.8 x FP8 dense TFLOPS ratio + 0.2 x bandwidth ratio), "
                      "plus the plan's host->device copies at 80% of PCIe Gen4 x16 (not overlapped)"}


# -- the sections ---------------------------------------------------------------------------------------------
class Run:
    """The results, where they are written, and the time budget the sections share."""

    def __init__(self, args, cuda: bool):
        from bench.latency import versions

        self.args, self.cuda, self.t0 = args, cuda, time.perf_counter()
        self.res = {"versions": versions(), "cap_gib": args.cap_gib, "weights": "random", "budget_s": args.budget,
                    "skipped": {}}
        self.failed = False

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def wants(self, section: str) -> bool:
        if section in self.args.skip:
            self.res["skipped"][section] = "--skip"
            return False
        if self.cuda and self.left() < SECTION_S[section]:
            self.res["skipped"][section] = (f"budget: {self.left():.0f} s left, the section takes about "
                                            f"{SECTION_S[section]}")
            return False
        return True

    def save(self) -> None:
        from bench.output import save_json

        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        save_json(self.res, "capped", self.args.out)


def _error(e: Exception) -> dict:
    return {"error": f"{type(e).__name__}: {str(e)[:400]}"}


def _reset():
    import torch

    torch._dynamo.reset()
    _release()


def _capped(run: Run, source, pipe, settings, jobs, measured: int):
    """The capped run of `pipe` (in host memory): cap, Service.load with MEMORY_PLAN=auto (a CPU cannot be
    capped: the plan is forced there, so its path runs), the jobs; uncapped again after."""
    ballast, ballast_gib = None, 0.0
    try:
        if run.cuda:
            cap = cap_memory(run.args.cap_gib)
            ballast = cap.pop("ballast", None)
            ballast_gib = cap.get("ballast_gib", 0.0)
            run.res.setdefault("cap", cap)
        out, service = run_service(source, pipe, settings, jobs, ballast_gib, measured)
        return out, service
    finally:
        del ballast
        uncap()


def _base_settings(run: Run, size: int, **kw):
    from app.config import Settings

    out_dir = tempfile.mkdtemp(prefix="capped-")
    return lambda plan: Settings(output_uri=out_dir, job_timeout_s=3600, shapes=f"{size}x{size}",
                                 compile="regional" if run.cuda else "off", device="cuda" if run.cuda else "cpu",
                                 memory_plan=plan, warmup=run.cuda, **kw)  # the CPU's run: plumbing only


def flux_section(run: Run) -> None:
    args, cuda = run.args, run.cuda
    size = args.size or (1024 if cuda else 256)
    steps = args.steps or (28 if cuda else 2)
    job = {"prompt": PROMPT, "width": size, "height": size, "num_inference_steps": steps, "seed": 0}
    jobs = [job, job] if cuda else [job]  # a warm job first on the GPU (the CPU's plumbing run skips it)
    source, build = _model("flux", not cuda)
    settings = _base_settings(run, size)
    res = run.res["flux"] = {"size": size, "steps": steps}
    try:
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        res["uncapped"], service = run_service(source, pipe, settings("resident"), jobs)
        res["uncapped"]["job_phases"] = job_phases(service, job)
        res["uncapped"]["phase_peaks"] = phase_peaks(service, size, steps)
        run.save()
        res["text_fp8"] = text_fp8(service, job, size, steps)
        del service, pipe
    except Exception as e:  # keep going: the capped run is the point
        res.setdefault("uncapped", {}).update(_error(e))
        run.failed = True
        pipe = service = None  # noqa: F841  (their GPU memory must go before the capped run)
    _reset()
    run.save()
    try:
        pipe = build().to("cpu")  # same seed, same weights; host memory first, as a capped loader does
        pipe.set_progress_bar_config(disable=True)
        _release()
        res["capped"], service = _capped(run, source, pipe, settings("auto" if cuda else "offload-text"),
                                         jobs, -1)
        res["capped"]["job_phases"] = job_phases(service, job)
        del service, pipe
    except Exception as e:
        res["capped"] = _error(e)
        run.failed = True
    _reset()
    up, cap = res.get("uncapped", {}).get("measured"), res.get("capped", {}).get("measured")
    if up and cap and up.get("ok") and cap.get("ok"):
        res["capped_over_uncapped"] = round(cap["total_ms"] / up["total_ms"], 3)
        res["goal_at_most"] = 1.15
        if cuda:
            from app.families import FAMILIES

            table = FAMILIES["flux"].memory_table()["fp8"]
            plan = res["capped"]["plan"]["memory"]
            res["rtx4090_estimate"] = estimate_4090(up["total_ms"] / 1000, plan, table, steps)
    else:
        run.failed = True
    run.save()


def _decompile(module) -> None:
    """Undo `compile_repeated_blocks` (nn.Module.compile per block): a streamed denoiser runs eager."""
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


def qwen_section(run: Run) -> None:
    args, cuda = run.args, run.cuda
    name = "qwen-image-edit-plus"
    size = args.size or (1024 if cuda else 256)
    # 2 and 3 CFG steps: their difference is a CFG step (one step would be NaN: Qwen's scheduler stretches
    # its sigmas to shift_terminal by dividing by the last one's distance from 0)
    steps_cfg = (2, 3)
    ref = image_ref(size)
    base = {"prompt": EDIT_PROMPT, "image": ref, "width": size, "height": size, "seed": 0}
    fast = dict(base, num_inference_steps=4 if cuda else 2, guidance_scale=1.0)  # the 4-step setting: no CFG
    jobs = ([fast, fast] if cuda else [fast]) + [dict(base, num_inference_steps=n, guidance_scale=4.0)
                                                 for n in steps_cfg]
    measured = len(jobs) - 3
    source, build = _model(name, not cuda)
    settings = _base_settings(run, size)
    res = run.res["qwen"] = {"family": name, "size": size, "reference": f"{size}x{size}", "jobs": "4 steps no CFG "
                             "(warm, measured), then 2 and 3 steps with true CFG 4 (CPU: 2 steps, no warm job)"}
    pipe = None
    try:
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        res["uncapped"], service = run_service(source, pipe, settings("resident"), jobs, measured=measured)
        res["uncapped"]["job_phases"] = job_phases(service, fast)
        del service
    except Exception as e:
        res.setdefault("uncapped", {}).update(_error(e))
        run.failed = True
    _reset()
    run.save()
    try:
        if pipe is None:
            raise RuntimeError("no uncapped pipeline to take the FP8 weights from")
        _decompile(pipe.transformer)
        pipe.to("cpu")  # FP8 as the uncapped recipe left it: what a baked load hands a 24 GB card
        _release()
        res["capped"], service = _capped(run, source, pipe, settings("auto" if cuda else "offload-blocks"), jobs,
                                         measured)
        res["capped"]["job_phases"] = job_phases(service, fast)
        del service
    except Exception as e:
        res["capped"] = _error(e)
        run.failed = True
    del pipe
    _reset()
    for key in ("uncapped", "capped"):
        r = res.get(key, {})
        if len(r.get("jobs", [])) == len(jobs) and all(j["ok"] for j in r["jobs"]):
            one, three = r["jobs"][-2]["total_ms"] / 1000, r["jobs"][-1]["total_ms"] / 1000
            step = (three - one) / (steps_cfg[1] - steps_cfg[0])
            r["cfg_step_s"] = round(step, 3)
            r["cfg40_estimate_s"] = round(one + (40 - steps_cfg[0]) * step, 2)
    up, cap = res.get("uncapped", {}).get("measured"), res.get("capped", {}).get("measured")
    if up and cap and up.get("ok") and cap.get("ok"):
        res["capped_over_uncapped"] = round(cap["total_ms"] / up["total_ms"], 3)
        res["goal_at_most"] = 3.0
        if cuda:
            from app.families import FAMILIES

            table = FAMILIES[name].memory_table()["fp8"]
            plan = res["capped"]["plan"]["memory"]
            res["rtx4090_estimate"] = estimate_4090(up["total_ms"] / 1000, plan, table, 4)
            if "cfg40_estimate_s" in res["uncapped"]:
                res["rtx4090_estimate_cfg40"] = estimate_4090(res["uncapped"]["cfg40_estimate_s"], plan, table, 80)
    else:
        run.failed = True
    run.save()


def _forward_s(t, kw, reps: int) -> float:
    import statistics

    import torch

    with torch.inference_mode():
        for _ in range(2):
            t(**kw)
        times = []
        for _ in range(reps):
            _sync()
            t0 = time.perf_counter()
            t(**kw)
            _sync()
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4)


def _kernels(t, kw) -> list[str]:
    """The GPU kernels of one forward whose names say a low-precision GEMM ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        t(**kw)
        _sync()
    names = {e.key for e in prof.key_averages()}
    marks = ("int8", "s8", "i8", "int_mm", "imma", "_int")
    return sorted(n for n in names if any(m in n.lower() for m in marks))[:12]


def int8_section(run: Run) -> None:
    """The FLUX denoiser in bf16, then the same module INT8 (torchao dynamic): speed, peak, error."""
    import types

    import torch

    from app.families import FAMILIES
    from app.optimize import compile_denoiser
    from weights.quantize import fuse_qkv, is_torchao, quantize_denoiser, skip_patterns

    family = FAMILIES["flux"]
    cuda = run.cuda
    size = run.args.size or (1024 if cuda else 256)
    res = run.res["int8"] = {"size": size, "attention": "sdpa", "compile": "regional" if cuda else "off"}
    try:
        if cuda:
            from bench.models import build_flux_transformer

            t = build_flux_transformer("cuda")
            holder = types.SimpleNamespace(transformer=t, vae_scale_factor=8)
        else:
            family = family.tiny_variant()
            holder = family.build_tiny()
            t = holder.transformer
        fuse_qkv(t)
        kw = family.denoiser_inputs(holder, size, size)
        reps = 5 if cuda else 1
        for precision in ("bf16", "int8"):
            _reset()
            rec = res[precision] = {}
            t0 = time.perf_counter()
            if precision == "int8":
                import torchao

                rec["torchao"] = torchao.__version__
                rec["quantized_linears"] = len(quantize_denoiser(t, "int8", skip_patterns(family.quant_skip)))
                w = next(m.weight for m in t.modules() if isinstance(m, torch.nn.Linear) and is_torchao(m.weight))
                rec["weight_type"] = type(w).__name__
            run_t = compile_denoiser(t, "regional", "off") if cuda else t
            with torch.inference_mode():
                first = time.perf_counter()
                out = run_t(**kw)[0].float()
                rec["first_call_s"] = round(time.perf_counter() - first, 2)
            rec["prepare_s"] = round(time.perf_counter() - t0, 2)
            rec["forward_s"] = _forward_s(run_t, kw, reps)
            if cuda:
                rec["peak_GiB"] = _gib(torch.cuda.max_memory_allocated())
                rec["weights_GiB"] = _gib(torch.cuda.memory_allocated())
            if precision == "bf16":
                ref = out
            else:
                rec["rel_err_vs_bf16"] = _rel(out, ref)
                if cuda:
                    rec["int8_kernels"] = _kernels(run_t, kw)
                    rec["torchao_kernels_seen"] = bool(rec["int8_kernels"])
            run.save()
        res["int8_over_bf16"] = round(res["int8"]["forward_s"] / res["bf16"]["forward_s"], 3)
        res["int8_faster"] = res["int8_over_bf16"] < 1.0
        del t, holder, kw
    except Exception as e:
        res.update(_error(e))
        run.failed = True
    _reset()
    run.save()


# FLUX's modulation linears (every block's AdaLN projection): 3.2B of the 11.9B parameters, kept bf16 by the
# family's skip list, so 6 GiB of its 14.2 GiB FP8 denoiser.
MODULATION = (r".*norm1(_context)?\.linear", r"single_transformer_blocks\.\d+\.norm\.linear")


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def modfp8_section(run: Run) -> None:
    """The FLUX denoiser alone, eager: bf16, the FP8 recipe (skip list kept), then its modulation linears
    FP8 too: weight GiB, forward time and relative error of one forward against bf16's (random weights)."""
    import re
    import types

    import torch

    from app.families import FAMILIES
    from weights.fp8 import swap_linears
    from weights.quantize import fuse_qkv, quantize_denoiser, skip_patterns

    family = FAMILIES["flux"] if run.cuda else FAMILIES["flux"].tiny_variant()
    size = run.args.size or (1024 if run.cuda else 256)
    res = run.res["modfp8"] = {"size": size, "compile": "off", "modulation": list(MODULATION)}
    try:
        if run.cuda:
            from bench.models import build_flux_transformer

            t = build_flux_transformer("cuda")
            holder = types.SimpleNamespace(transformer=t, vae_scale_factor=8)
        else:
            holder = family.build_tiny()
            t = holder.transformer
        fuse_qkv(t)
        kw = family.denoiser_inputs(holder, size, size)
        reps = 3 if run.cuda else 1
        with torch.inference_mode():
            ref = t(**kw)[0].float()
        res["bf16"] = {"weights_bytes": _bytes(t), "weights_GiB": _gib(_bytes(t)),
                       "forward_s": _forward_s(t, kw, reps)}
        quantize_denoiser(t, "fp8", family.skips, fuse=True)
        with torch.inference_mode():
            fp8 = t(**kw)[0].float()
        res["fp8_recipe"] = {"weights_bytes": _bytes(t), "weights_GiB": _gib(_bytes(t)),
                             "forward_s": _forward_s(t, kw, reps), "rel_err_vs_bf16": _rel(fp8, ref)}
        mod = [re.compile(p) for p in MODULATION]
        swapped = swap_linears(t, keep=lambda n: not any(p.fullmatch(n) for p in mod))
        with torch.inference_mode():
            out = t(**kw)[0].float()
        res["fp8_modulation_too"] = {"swapped": len(swapped), "weights_bytes": _bytes(t),
                                     "weights_GiB": _gib(_bytes(t)), "forward_s": _forward_s(t, kw, reps),
                                     "rel_err_vs_bf16": _rel(out, ref), "rel_err_vs_fp8_recipe": _rel(out, fp8)}
        del t, holder, kw
    except Exception as e:
        res.update(_error(e))
        run.failed = True
    _reset()
    run.save()


SECTIONS = {"flux": flux_section, "qwen": qwen_section, "modfp8": modfp8_section, "int8": int8_section}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench capped", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU: the tiny pipelines")
    ap.add_argument("--cap-gib", type=float, default=23.5)
    ap.add_argument("--size", type=int, default=None, help="default 1024 (tiny: 256)")
    ap.add_argument("--steps", type=int, default=None, help="FLUX steps, default 28 (tiny: 2)")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds: a later section that would not fit in what is left is skipped (GPU only)")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: flux,qwen,modfp8,int8")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}

    import torch

    run = Run(args, torch.cuda.is_available() and not args.tiny)
    for section, fn in SECTIONS.items():
        if run.wants(section):
            t0 = time.perf_counter()
            fn(run)
            run.res[section]["section_s"] = round(time.perf_counter() - t0, 1)
    run.save()
    return 1 if run.failed else 0
