"""`python -m bench quant`: FP8Linear's activation quantizer as torch.compile fuses it into FLUX's
single-block producer (bias + tanh-GELU + concatenation with the attention output, 4608 x 15360),
with stages left out, at Inductor's default realize threshold and at a higher one.

Why: this one kernel took 7.9 ms of a 96 ms step on the H200 profile, about 2.5x what its bytes
need. Nsight Compute showed it storing the concatenated row in fp32 and reading it back: Inductor
realizes a pointwise producer of more than `realize_opcount_threshold` ops (30) that a reduction reads
twice. Times are do_bench medians in microseconds."""

from __future__ import annotations

import json
import os

import torch

M, ATTN, MLP = 4608, 3072, 12288


def _quant(x):
    """FP8Linear.forward's activation quantizer (app/fp8.py), verbatim."""
    sx = (x.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
    return (x.float() / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), sx


def cases():
    F = torch.nn.functional
    g = torch.Generator("cuda").manual_seed(0)
    mlp, attn = (torch.randn(M, n, device="cuda", dtype=torch.bfloat16, generator=g) for n in (MLP, ATTN))
    bias = torch.randn(MLP, device="cuda", dtype=torch.bfloat16, generator=g)
    return {
        "full": lambda: _quant(torch.cat([attn, F.gelu(mlp + bias, approximate="tanh")], dim=-1)),
        "no_gelu": lambda: _quant(torch.cat([attn, mlp + bias], dim=-1)),
        "no_cat": lambda: _quant(F.gelu(mlp + bias, approximate="tanh")),
        "quant_only": lambda: _quant(mlp),
        "gelu_only": lambda: F.gelu(mlp + bias, approximate="tanh"),
        "copy_to_fp8": lambda: mlp.to(torch.float8_e4m3fn),
    }


def main(thresholds=(None, 100)) -> dict:
    import torch._inductor.config as ic
    from triton.testing import do_bench

    from bench.latency import versions

    res = {"versions": versions(), "shape": [M, ATTN + MLP], "us": {}}
    saved = ic.realize_opcount_threshold
    try:
        for th in thresholds:
            ic.realize_opcount_threshold = saved if th is None else th
            row = res["us"][f"realize_opcount_threshold={th if th is not None else 'default'}"] = {}
            for name, fn in cases().items():
                torch._dynamo.reset()
                compiled = torch.compile(fn, fullgraph=True)
                got = compiled()
                row[name] = round(do_bench(compiled, warmup=25, rep=100, return_mode="median") * 1000, 1)
                if name == "full":  # the compiled codes must equal eager's
                    ref = fn()
                    row["full_codes_equal_eager"] = bool(torch.equal(got[0].view(torch.uint8), ref[0].view(torch.uint8)))
            print(json.dumps(row), flush=True)
    finally:
        ic.realize_opcount_threshold = saved
    out = os.environ.get("OUT", "bench/results")
    with open(os.path.join(out, "quant_kernel.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res
