"""One-call GPU probe for the speed work: attention kernels, FP8Linear vs torchao compile cost,
per-step speed, VRAM, fidelity, and a compile cache carried to a fresh process.

    python -m bench.probe            # writes $OUT/probe.json progressively
    python -m bench.probe child DIR  # (internal) fresh process: rebuild, recipe, load cache, first call
FLUX.1-dev shape, random weights, 1024x1024.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

T = time.perf_counter
OUT = os.environ.get("OUT", "bench/results")
RES: dict = {}


def save():
    with open(os.path.join(OUT, "probe.json"), "w") as f:
        json.dump(RES, f, indent=1)
    print("PROGRESS", json.dumps(RES)[-600:], flush=True)


def sync():
    import torch

    torch.cuda.synchronize()


def per_step(pipe, pe, ppe, steps=8, reps=2):
    """Median ms per denoising step at 1024x1024 (prompt embeddings precomputed)."""
    import torch

    ts = []
    with torch.inference_mode():
        for _ in range(reps):
            sync(); a = T()
            pipe(prompt_embeds=pe, pooled_prompt_embeds=ppe, height=1024, width=1024, num_inference_steps=steps,
                 guidance_scale=3.5, output_type="latent")
            sync(); ts.append((T() - a) * 1000 / steps)
    return round(statistics.median(ts), 1)


def first_call(pipe, pe, ppe):
    import torch

    with torch.inference_mode():
        sync(); a = T()
        pipe(prompt_embeds=pe, pooled_prompt_embeds=ppe, height=1024, width=1024, num_inference_steps=2,
             guidance_scale=3.5, output_type="latent")
        sync()
    return round(T() - a, 2)


def fidelity_inputs(pipe):
    import torch

    g = torch.Generator("cuda").manual_seed(0)
    t = pipe.transformer
    n_img, n_txt = 1024, 512
    return dict(
        hidden_states=torch.randn(1, n_img, 64, generator=g, device="cuda", dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, n_txt, 4096, generator=g, device="cuda", dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, 768, generator=g, device="cuda", dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], device="cuda", dtype=torch.bfloat16),
        guidance=torch.tensor([3.5], device="cuda", dtype=torch.bfloat16),
        img_ids=torch.zeros(n_img, 3, device="cuda", dtype=torch.bfloat16),
        txt_ids=torch.zeros(n_txt, 3, device="cuda", dtype=torch.bfloat16),
        return_dict=False,
    )


def small_compile(kind: str) -> dict:
    """Compile time + graph count of regional compile on a 2+4-block full-width FLUX transformer."""
    import torch
    from diffusers import FluxTransformer2DModel

    from app.families import FLUX
    from app.fp8 import swap_linears
    from app.optimize import fuse_qkv

    torch._dynamo.reset()
    with torch.device("cuda"):
        t = FluxTransformer2DModel(num_layers=2, num_single_layers=4, guidance_embeds=True).to(torch.bfloat16)
    fuse_qkv(t)
    if kind == "fp8linear":
        swap_linears(t, keep=FLUX.skips)
    else:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(t, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and not FLUX.skips(n))
    t.compile_repeated_blocks(fullgraph=True, dynamic=False)
    from torch._dynamo.utils import counters

    inp = dict(hidden_states=torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16),
               encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
               pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
               timestep=torch.tensor([0.5], device="cuda", dtype=torch.bfloat16),
               guidance=torch.tensor([3.5], device="cuda", dtype=torch.bfloat16),
               img_ids=torch.zeros(4096, 3, device="cuda", dtype=torch.bfloat16),
               txt_ids=torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16), return_dict=False)
    with torch.inference_mode():
        sync(); a = T(); t(**inp); sync(); first = T() - a
        sync(); a = T(); t(**inp); sync(); second = T() - a
    out = {"first_s": round(first, 2), "second_ms": round(second * 1000, 1),
           "unique_graphs": counters["stats"]["unique_graphs"], "frames_ok": counters["frames"]["ok"]}
    del t
    torch.cuda.empty_cache()
    return out


def main():
    t_start = T()
    import torch

    RES["gpu"] = torch.cuda.get_device_name(0)
    RES["torch"] = torch.__version__
    import diffusers

    RES["diffusers"] = diffusers.__version__
    from bench.models import build_flux_dev
    from app.attention import set_attention
    from app.families import FLUX
    from app.fp8 import swap_linears
    from app.optimize import fuse_qkv

    RES["import_s"] = round(T() - t_start, 1)
    import torch._inductor.config as ic

    before = {k: getattr(ic, k) for k in ("max_autotune", "max_autotune_gemm", "coordinate_descent_tuning",
                                          "epilogue_fusion", "force_fuse_int_mm_with_mul", "use_mixed_mm")
              if hasattr(ic, k)}
    import torchao  # noqa: F401  (does importing torchao change inductor's settings?)

    after = {k: getattr(ic, k) for k in before}
    RES["inductor_changed_by_torchao"] = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    RES["torchao"] = torchao.__version__
    pipe = build_flux_dev()
    sync()
    with torch.inference_mode():
        pe, ppe, _ = pipe.encode_prompt(prompt="a cat holding a sign", prompt_2=None, max_sequence_length=512)
    RES["mem_after_build_GiB"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    save()

    # 1. attention kernels, eager bf16
    first_call(pipe, pe, ppe)
    RES["bf16_eager_native_ms"] = per_step(pipe, pe, ppe)
    for name in ("cudnn", "fa3", "flash"):
        try:
            used = set_attention(pipe.transformer, name)
            first_call(pipe, pe, ppe)
            RES[f"bf16_eager_{used}_ms"] = per_step(pipe, pe, ppe)
        except Exception as e:
            RES[f"bf16_eager_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        save()
    best = min((k for k in RES if k.startswith("bf16_eager_") and k.endswith("_ms")), key=RES.get)
    best_attn = best.removeprefix("bf16_eager_").removesuffix("_ms")
    RES["best_attention"] = best_attn
    set_attention(pipe.transformer, best_attn) if best_attn != "native" else pipe.transformer.set_attention_backend("native")

    # 2. fidelity reference, fuse (dropping unfused), FP8Linear
    inp = fidelity_inputs(pipe)
    with torch.inference_mode():
        ref = pipe.transformer(**inp)[0].float()
    freed = fuse_qkv(pipe.transformer)
    RES["fuse_freed_params_B"] = round(freed / 1e9, 2)
    torch.cuda.empty_cache()
    RES["mem_after_fuse_GiB"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    n = swap_linears(pipe.transformer, keep=FLUX.skips)
    torch.cuda.empty_cache()
    RES["fp8_linears"] = len(n)
    RES["mem_after_fp8_GiB"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    with torch.inference_mode():
        out = pipe.transformer(**inp)[0].float()
    RES["fp8_rel_err_vs_bf16"] = round(((out - ref).norm() / ref.norm()).item(), 5)
    first_call(pipe, pe, ppe)
    RES["fp8_eager_ms"] = per_step(pipe, pe, ppe, steps=4, reps=1)
    save()

    # 3. regional compile of FP8Linear blocks
    pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    RES["fp8_regional_first_call_s"] = first_call(pipe, pe, ppe)
    RES["fp8_regional_ms"] = per_step(pipe, pe, ppe, steps=8, reps=3)
    from torch._dynamo.utils import counters

    RES["fp8_regional_unique_graphs"] = counters["stats"]["unique_graphs"]
    save()

    # 4. end to end, 28 steps, VAE channels_last off/on
    for cl in (False, True):
        if cl:
            pipe.vae.to(memory_format=torch.channels_last)
        e2e = []
        with torch.inference_mode():
            for _ in range(3):
                sync(); a = T()
                pipe("a cat holding a sign", height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5)
                sync(); e2e.append(T() - a)
        RES[f"e2e_s_vae_cl_{cl}"] = round(statistics.median(e2e), 3)
        save()
    RES["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    # 5. compile cache: save artifacts, then fresh processes
    art = torch.compiler.save_cache_artifacts()
    blob = os.path.join("/tmp", "probe_cache.bin")
    with open(blob, "wb") as f:
        f.write(art[0] if art else b"")
    RES["cache_bytes"] = len(art[0]) if art else 0
    save()
    del pipe
    torch.cuda.empty_cache()
    for mode in ("artifacts", "none"):
        try:
            r = subprocess.run([sys.executable, "-m", "bench.probe", "child", mode, best_attn], capture_output=True,
                               text=True, timeout=170)
            line = [l for l in r.stdout.splitlines() if l.startswith("CHILD")]
            RES[f"child_{mode}"] = json.loads(line[-1][5:]) if line else {"rc": r.returncode, "err": r.stderr[-800:]}
        except subprocess.TimeoutExpired:
            RES[f"child_{mode}"] = "timeout 170 s"
        save()

    # 6. diagnose compile cost: torchao subclass vs FP8Linear, 6 full-width blocks
    for kind in ("fp8linear", "torchao"):
        try:
            RES[f"small6_{kind}"] = small_compile(kind)
        except Exception as e:
            RES[f"small6_{kind}"] = f"{type(e).__name__}: {str(e)[:300]}"
        save()
    RES["total_s"] = round(T() - t_start, 1)
    save()


def child(mode: str, attn: str):
    """Fresh process, fresh inductor/triton dirs: build, recipe, (load cache), first call."""
    import tempfile

    d = tempfile.mkdtemp()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = d + "/inductor"
    os.environ["TRITON_CACHE_DIR"] = d + "/triton"
    t0 = T()
    import torch

    from app.attention import set_attention
    from app.families import FLUX
    from app.fp8 import swap_linears
    from app.optimize import fuse_qkv
    from bench.models import build_flux_dev

    r = {"import_s": round(T() - t0, 1)}
    pipe = build_flux_dev()
    if attn != "native":
        set_attention(pipe.transformer, attn)
    fuse_qkv(pipe.transformer)
    swap_linears(pipe.transformer, keep=FLUX.skips)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    r["ready_to_compile_s"] = round(T() - t0, 1)
    if mode == "artifacts":
        a = T()
        with open("/tmp/probe_cache.bin", "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())
        r["load_artifacts_s"] = round(T() - a, 2)
    with torch.inference_mode():
        pe, ppe, _ = pipe.encode_prompt(prompt="a cat", prompt_2=None, max_sequence_length=512)
    r["first_call_s"] = first_call(pipe, pe, ppe)
    r["per_step_ms"] = per_step(pipe, pe, ppe, steps=8, reps=1)
    r["process_to_ready_s"] = round(T() - t0, 1)
    print("CHILD" + json.dumps(r), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
