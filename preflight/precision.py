"""The precision check: decide the plan from the card (preflight.plan's rules) and prove FP8 really runs.

FP8 is planned only when the capability allows it (>= 8.9) *and* a per-row-scaled `torch._scaled_mm`
(the kernel torchao's FP8 per-row recipe calls) runs here: a capability alone does not prove the
build has the kernel. A forced `PRECISION` the card cannot run fails loudly.
"""

from __future__ import annotations

from dataclasses import replace

from preflight.plan import Plan, PlanError, best_precision, choose_precision
from preflight.gpu import GpuFacts
from preflight.report import Check, fail, first_line, ok, warn

CPU_PLAN = Plan("cpu", "fp32")


def fp8_smoke() -> str | None:
    """None when a per-row-scaled FP8 matmul runs on device 0, else why not (one line)."""
    import torch

    try:
        a = torch.randn(64, 64, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(64, 64, device="cuda").to(torch.float8_e4m3fn).t()  # _scaled_mm wants b column-major
        scale_a = torch.ones(64, 1, device="cuda")
        scale_b = torch.ones(1, 64, device="cuda")
        out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        return None if bool(torch.isfinite(out).all()) else "non-finite result"
    except (RuntimeError, AttributeError, TypeError, ValueError) as e:
        return first_line(e)


def check_precision_cpu(requested: str) -> tuple[Check, Plan]:
    """CPU mode: the reference fp32 path; a forced fp8/int8 is refused (they are GPU kernels)."""
    try:
        precision = choose_precision(requested, None)
    except PlanError as e:
        return fail("precision", e.message), CPU_PLAN
    return ok("precision", f"{precision} on the CPU (quantized plans need a GPU)"), Plan("cpu", precision)


def check_precision(requested: str, gpu: GpuFacts, smoke=fp8_smoke) -> tuple[Check, Plan]:
    """(check, plan) for `PRECISION=requested` on `gpu`: FP8 >= 8.9 when the smoke test passes, INT8 on
    8.0/8.6, bf16 otherwise; FP4 (>= 10.0) is reported, not used yet."""
    cap = gpu.capability
    why_not_fp8 = smoke() if cap >= (8, 9) and requested in ("auto", "fp8") else None
    best = best_precision(cap, fp8_works=why_not_fp8 is None)
    fp4 = cap >= (10, 0)
    plan = Plan("cuda", best, cap, gpu.name, fp4)
    tail = "; FP4 available (not used yet)" if fp4 else ""
    try:
        precision = choose_precision(requested, cap, fp8_works=why_not_fp8 is None)
    except PlanError as e:
        because = f" ({why_not_fp8})" if why_not_fp8 else ""
        return fail("precision", f"{e.message}{because}; this card's best plan is {best}"), plan
    plan = replace(plan, precision=precision)
    if why_not_fp8:  # the card should do FP8 and cannot: worth a look, not worth refusing the worker
        return warn("precision", f"{precision} on {gpu.sm}: the FP8 smoke test failed ({why_not_fp8}){tail}"), plan
    forced = " (forced by PRECISION)" if requested != "auto" else ""
    proof = "; FP8 per-row matmul ran" if precision == "fp8" else ""
    return ok("precision", f"{precision} on {gpu.sm}{forced}{proof}{tail}"), plan
