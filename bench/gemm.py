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
    from app.fp8 import quantize_rows

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
            import mslk  # noqa: F401  (FBGEMM GenAI kernels, if the wheel loads)

            f = torch.ops.mslk.f8f8bf16_rowwise
            cases["mslk_rowwise"] = lambda: f(xq, wq, xs.view(-1), ws.view(-1))
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


def attention() -> dict:
    """FA3 bf16 vs FA3 FP8 (e4m3, per-tensor descale) vs SDPA at FLUX's attention shape."""
    q, k, v = (torch.randn(1, 4608, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    res = {}
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    flops = 4 * 4608 * 4608 * 128 * 24
    res["sdpa"] = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
    try:
        from fa3_fwd_interface import flash_attn_func

        o = flash_attn_func(q, k, v)
        o = o[0] if isinstance(o, tuple) else o
        res["fa3_bf16"] = _bench(lambda: flash_attn_func(q, k, v))
        res["fa3_bf16_rel_err"] = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        f8 = torch.float8_e4m3fn
        ds = [((t.abs().amax() / 448).float().reshape(1, 1).expand(1, 24).contiguous()) for t in (q, k, v)]
        q8, k8, v8 = ((t / d.view(1, 1, 24, 1).to(t.dtype)).to(f8) for t, d in zip((q, k, v), ds))
        o8 = flash_attn_func(q8, k8, v8, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2])
        o8 = o8[0] if isinstance(o8, tuple) else o8
        res["fa3_fp8"] = _bench(lambda: flash_attn_func(q8, k8, v8, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2]))
        res["fa3_fp8_rel_err"] = ((o8.float() - ref.float()).norm() / ref.float().norm()).item()
    except Exception as e:
        res["fa3_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for key in [k for k in res if not k.endswith(("err", "error"))]:
        res[key] = {"ms": round(res[key], 4), "tflops": round(flops / res[key] / 1e9)}
    return res


def main() -> dict:
    from bench.latency import versions

    res = {"versions": versions(), "gemm": gemms(), "attention": attention()}
    out = os.environ.get("OUT", "bench/results")
    with open(os.path.join(out, "gemm.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res["attention"]))
    return res
