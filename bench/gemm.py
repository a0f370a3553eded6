"""`python -m bench gemm`: the FP8 GEMM paths for FLUX.1-dev's linear shapes on this GPU, and FA3
attention in bf16 vs FP8, to choose FP8Linear's kernel and the attention kernel by measurement.

Shapes (M tokens x K -> N): 4608 tokens at 1024x1024 (4096 image + 512 text)."""

from __future__ import annotations

import json
import os

import torch

SHAPES = [(4608, 3072, 9216), (4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072),
          (4608, 3072, 21504), (4608, 15360, 3072), (512, 3072, 9216)]


def _bench(fn, iters=50):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def gemms() -> list[dict]:
    from weights.fp8 import quantize_rows

    out = []
    for m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        wq, ws = quantize_rows(w)
        xq, xs = quantize_rows(x)
        one = torch.ones((), device="cuda")
        flops = 2 * m * k * n
        r = {"shape": [m, k, n]}
        cases = {
            "bf16": lambda: torch.nn.functional.linear(x, w, b),
            "rowwise_bias": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), bias=b, out_dtype=torch.bfloat16),
            "rowwise": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16),
            "tensorwise": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
            "tensorwise_fast_accum": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                              out_dtype=torch.bfloat16, use_fast_accum=True),
            "rowwise_fast_accum": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(),
                                                           out_dtype=torch.bfloat16, use_fast_accum=True),
        }
        try:
            import mslk  # noqa: F401  (MSLK, formerly FBGEMM GenAI: its CUTLASS row-wise FP8 GEMM)

            mslk_rowwise = lambda a, b, sa, sb: torch.ops.mslk.f8f8bf16_rowwise(  # noqa: E731
                a, b, sa.reshape(-1), sb.reshape(-1), use_fast_accum=True)
            mine = mslk_rowwise(xq, wq, xs, ws).float()
            cublas = cases["rowwise_fast_accum"]().float()
            r["mslk_vs_cublas_rel"] = round(((mine - cublas).norm() / cublas.norm()).item(), 6)
            cases["mslk_rowwise"] = lambda: mslk_rowwise(xq, wq, xs, ws)
        except Exception as e:
            r["mslk"] = f"{type(e).__name__}: {str(e)[:120]}"
        for name, fn in cases.items():
            try:
                ms = _bench(fn)
                r[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 0)}
            except Exception as e:
                r[name] = f"{type(e).__name__}: {str(e)[:120]}"
        out.append(r)
        print(json.dumps(r), flush=True)
    return out


def _first(o):
    return o[0] if isinstance(o, tuple) else o


def attention() -> dict:
    """SDPA, FA3 bf16, FA3 e4m3 (per-tensor scales; per-head scales with K centred, as app.attention's
    `fa3_fp8`) and FA4 (the CuTe DSL build) where it loads, at FLUX's shape: ms, TFLOP/s, error vs SDPA.

    Q/K/V are Gaussian with a per-channel offset on K (real keys share one; centring removes it)."""
    from app.attention import fp8_inputs, run_fa3
    from weights.fp8 import quantize_e4m3

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4608, 24, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    k = k + 2 * torch.randn(1, 1, 24, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  SDPA takes [batch, heads, seq, dim]
    ref = t(torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v))).float()
    err = lambda o: round(((_first(o).float() - ref).norm() / ref.norm()).item(), 5)  # noqa: E731
    cases = {"sdpa": lambda: t(torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v)))}
    missing = []
    try:
        from fa3_fwd_interface import flash_attn_func

        per_tensor = [quantize_e4m3(x, (0, 1, 2, 3)) for x in (q, k, v)]  # one scale for the whole tensor
        (q8, k8, v8), ds = zip(*((c, s.reshape(1, 1).expand(1, 24).contiguous()) for c, s in per_tensor))
        (qh, kh, vh), (qd, kd, vd) = fp8_inputs(q, k, v)
        cases["fa3_bf16"] = lambda: flash_attn_func(q, k, v)
        cases["fa3_fp8_tensor"] = lambda: flash_attn_func(q8, k8, v8, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2])
        cases["fa3_fp8_head_centred"] = lambda: flash_attn_func(qh, kh, vh, q_descale=qd, k_descale=kd, v_descale=vd)
        # app.attention's fa3_fp8 path, quantization included (eager here: an upper bound of its cost)
        cases["fa3_fp8_with_quantize"] = lambda: run_fa3(flash_attn_func, q, k, v, fp8=True)
    except Exception as e:
        missing.append(f"fa3 {type(e).__name__}: {str(e)[:300]}")
    try:
        from flash_attn.cute import flash_attn_func as fa4

        cases["fa4_bf16"] = lambda: fa4(q, k, v)
    except Exception as e:
        missing.append(f"fa4 {type(e).__name__}: {str(e)[:300]}")
    flops = 4 * 4608 * 4608 * 128 * 24
    res = {"fa_error": "; ".join(missing)} if missing else {}
    for name, fn in cases.items():
        try:
            ms = _bench(fn)
            res[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9), "rel_err": err(fn())}
        except Exception as e:
            res[name] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


def main() -> dict:
    from bench.latency import versions

    res = {"versions": versions(), "gemm": gemms(), "attention": attention()}
    out = os.environ.get("OUT", "bench/results")
    with open(os.path.join(out, "gemm.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res["attention"]))
    return res
