"""The capped bench's sections (bench/capped.py says what each measures) and the one runner they share.

Every stage of a section starts from released memory: the earlier stage's pipelines and services are
gone (they live in the stage's function only), Dynamo's compiled graphs reset, the allocator's cache
emptied and the cap lifted. The uncapped runs build their pipeline inside Service.load's loader, after
preflight, so preflight sees the card as a worker does and not beside the bench's own bf16 copy.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from bench.capped_measure import (cap_memory, error_record, estimate_4090, forward_s, gemm_kernels, job_phases,
                                  gib, nbytes, phase_peaks, rel, release, run_service, text_fp8, uncap)
from bench.capped_models import flux_denoiser, image_ref, model

EDIT_PROMPT = "make it a rainy night, keep the lighthouse"
# Seconds a section takes on an H200 (the runs of 2026-12-02, rounded up): skipped when less is left.
SECTION_S = {"flux": 260, "qwen": 200, "modfp8": 45, "int8": 90}
# FLUX's modulation linears (every block's AdaLN projection): 3.2B of the 11.9B parameters, kept bf16 by the
# family's skip list, so 6 GiB of its 14.2 GiB FP8 denoiser.
MODULATION = (r".*norm1(_context)?\.linear", r"single_transformer_blocks\.\d+\.norm\.linear")


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

    def stage(self, where: dict, fn: Callable[[dict], None]) -> None:
        """`fn(where)` from released memory: its figures in `where`, an exception recorded there (the next
        stage still runs); then its memory released and the results saved."""
        uncap()
        try:
            fn(where)
        except Exception as e:  # a stage's figures lost, not the bench
            where.update(error_record(e))
            self.failed = True
        _reset()
        self.save()

    def save(self) -> None:
        from bench.output import save_json

        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        save_json(self.res, "capped", self.args.out)


def _reset():
    import torch

    torch._dynamo.reset()
    uncap()


def _settings(run: Run, size: int):
    from app.config import Settings

    out_dir = tempfile.mkdtemp(prefix="capped-")
    return lambda plan: Settings(output_uri=out_dir, job_timeout_s=3600, shapes=f"{size}x{size}",
                                 compile="regional" if run.cuda else "off", device="cuda" if run.cuda else "cpu",
                                 memory_plan=plan, warmup=run.cuda)  # the CPU's run: plumbing only


def _decompile(module) -> None:
    """Undo `compile_repeated_blocks` (nn.Module.compile per block): a streamed denoiser runs eager."""
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


@dataclass
class Pair:
    """A family's uncapped Service run, then its capped one (MEMORY_PLAN=auto under the cap; a CPU cannot be
    capped, so `cpu_plan` is forced there and its path runs), on the same jobs."""

    family: str
    size: int
    jobs: list
    measured: int  # the index of the measured job (also the one whose phases are measured)
    cpu_plan: str
    goal: float  # capped over uncapped, at most
    forwards: int  # denoiser forwards of the measured job: the 4090 estimate's copies
    keep_pipe: bool = False  # the capped run takes the uncapped run's pipeline (FP8 as its recipe left it)
    extras: Callable | None = None  # (service, res): more figures of the uncapped worker


def run_pair(run: Run, res: dict, pair: Pair) -> dict | None:
    """Both runs into res["uncapped"] and res["capped"], then their ratio and (GPU) the 4090 estimate;
    returns the fp8 memory table and the capped plan for further estimates (None when a run failed)."""
    from app.families import FAMILIES

    source, build = model(pair.family, not run.cuda)
    settings = _settings(run, pair.size)
    phase_job, kept = pair.jobs[pair.measured], {}

    def uncapped(out: dict) -> None:
        rec, service = run_service(source, build, settings("resident"), pair.jobs, measured=pair.measured)
        out.update(rec)
        out["job_phases"] = job_phases(service, phase_job)
        if pair.extras:
            pair.extras(service, res)
        if pair.keep_pipe:
            kept["pipe"] = service.pipe

    def capped(out: dict) -> None:
        pipe = kept.pop("pipe", None)
        if pipe is None:  # same seed, same weights
            pipe = build()
        _decompile(getattr(pipe, FAMILIES[pair.family].denoiser))
        pipe.to("cpu")  # host memory first, as a capped loader does
        release()
        ballast, ballast_gib = None, 0.0
        if run.cuda:
            cap = cap_memory(run.args.cap_gib)
            ballast, ballast_gib = cap.pop("ballast", None), cap.get("ballast_gib", 0.0)
            run.res.setdefault("cap", cap)
        try:
            rec, service = run_service(source, lambda: pipe, settings("auto" if run.cuda else pair.cpu_plan),
                                       pair.jobs, ballast_gib, pair.measured)
            out.update(rec)
            out["job_phases"] = job_phases(service, phase_job)
        finally:
            del ballast

    run.stage(res.setdefault("uncapped", {}), uncapped)
    run.stage(res.setdefault("capped", {}), capped)
    return _compare(run, res, pair)


def _compare(run: Run, res: dict, pair: Pair) -> dict | None:
    from app.families import FAMILIES

    up, cap = res.get("uncapped", {}).get("measured"), res.get("capped", {}).get("measured")
    if not (up and cap and up.get("ok") and cap.get("ok")):
        run.failed = True
        return None
    res["capped_over_uncapped"] = round(cap["total_ms"] / up["total_ms"], 3)
    res["goal_at_most"] = pair.goal
    if not run.cuda:
        return None
    est = {"table": FAMILIES[pair.family].memory_table()["fp8"], "plan": res["capped"]["plan"]["memory"]}
    res["rtx4090_estimate"] = estimate_4090(up["total_ms"] / 1000, est["plan"], est["table"], pair.forwards)
    return est


# -- the sections ---------------------------------------------------------------------------------------------
def flux_section(run: Run) -> None:
    from bench.capped_measure import PROMPT

    cuda = run.cuda
    size = run.args.size or (1024 if cuda else 256)
    steps = run.args.steps or (28 if cuda else 2)
    job = {"prompt": PROMPT, "width": size, "height": size, "num_inference_steps": steps, "seed": 0}
    res = run.res["flux"] = {"size": size, "steps": steps}

    def extras(service, res: dict) -> None:
        res["uncapped"]["phase_peaks"] = phase_peaks(service, size, steps)
        run.save()
        res["text_fp8"] = text_fp8(service, job, size, steps)

    # a warm job first on the GPU (the CPU's plumbing run skips it)
    run_pair(run, res, Pair("flux", size, [job, job] if cuda else [job], -1, "offload-text", 1.15, steps,
                            extras=extras))
    run.save()


def qwen_section(run: Run) -> None:
    cuda = run.cuda
    name = "qwen-image-edit-plus"
    size = run.args.size or (1024 if cuda else 256)
    # 2 and 3 CFG steps: their difference is a CFG step (one step would be NaN: Qwen's scheduler stretches
    # its sigmas to shift_terminal by dividing by the last one's distance from 0)
    steps_cfg = (2, 3)
    base = {"prompt": EDIT_PROMPT, "image": image_ref(size), "width": size, "height": size, "seed": 0}
    fast = dict(base, num_inference_steps=4 if cuda else 2, guidance_scale=1.0)  # the 4-step setting: no CFG
    jobs = ([fast, fast] if cuda else [fast]) + [dict(base, num_inference_steps=n, guidance_scale=4.0)
                                                 for n in steps_cfg]
    res = run.res["qwen"] = {"family": name, "size": size, "reference": f"{size}x{size}", "jobs": "4 steps no CFG "
                             "(warm, measured), then 2 and 3 steps with true CFG 4 (CPU: 2 steps, no warm job)"}
    # the capped run: the uncapped run's FP8 weights in host memory, what a baked load hands a 24 GB card
    est = run_pair(run, res, Pair(name, size, jobs, len(jobs) - 3, "offload-blocks", 3.0, 4, keep_pipe=True))
    for key in ("uncapped", "capped"):
        r = res.get(key, {})
        if len(r.get("jobs", [])) == len(jobs) and all(j["ok"] for j in r["jobs"]):
            one, three = r["jobs"][-2]["total_ms"] / 1000, r["jobs"][-1]["total_ms"] / 1000
            step = (three - one) / (steps_cfg[1] - steps_cfg[0])
            r["cfg_step_s"] = round(step, 3)
            r["cfg40_estimate_s"] = round(one + (40 - steps_cfg[0]) * step, 2)
    if est and "cfg40_estimate_s" in res["uncapped"]:
        res["rtx4090_estimate_cfg40"] = estimate_4090(res["uncapped"]["cfg40_estimate_s"], est["plan"],
                                                      est["table"], 80)
    run.save()


def modfp8_section(run: Run) -> None:
    """The FLUX denoiser alone, eager: bf16, the FP8 recipe (skip list kept), then its modulation linears
    FP8 too: weight GiB, forward time and relative error of one forward against bf16's (random weights)."""
    size = run.args.size or (1024 if run.cuda else 256)
    res = run.res["modfp8"] = {"size": size, "compile": "off", "modulation": list(MODULATION)}

    def body(res: dict) -> None:
        import re

        import torch

        from weights.fp8 import swap_linears
        from weights.quantize import quantize_denoiser

        family, t, kw = flux_denoiser(run.cuda, size)
        reps = 3 if run.cuda else 1

        def measure(**more) -> tuple[dict, torch.Tensor]:
            with torch.inference_mode():
                out = t(**kw)[0].float()
            return {**more, "weights_bytes": nbytes(t), "weights_GiB": gib(nbytes(t)),
                    "forward_s": forward_s(t, kw, reps)}, out

        res["bf16"], ref = measure()
        quantize_denoiser(t, "fp8", family.skips, fuse=True)
        res["fp8_recipe"], fp8 = measure()
        res["fp8_recipe"]["rel_err_vs_bf16"] = rel(fp8, ref)
        mod = [re.compile(p) for p in MODULATION]
        swapped = swap_linears(t, keep=lambda n: not any(p.fullmatch(n) for p in mod))
        res["fp8_modulation_too"], out = measure(swapped=len(swapped))
        res["fp8_modulation_too"].update(rel_err_vs_bf16=rel(out, ref), rel_err_vs_fp8_recipe=rel(out, fp8))

    run.stage(res, body)


def int8_section(run: Run) -> None:
    """The FLUX denoiser in bf16, then the same module INT8 (torchao dynamic): speed, peak, error."""
    cuda = run.cuda
    size = run.args.size or (1024 if cuda else 256)
    res = run.res["int8"] = {"size": size, "attention": "sdpa", "compile": "regional" if cuda else "off"}

    def body(res: dict) -> None:
        import torch

        from app.optimize import compile_denoiser
        from weights.quantize import is_torchao, quantize_denoiser, skip_patterns

        family, t, kw = flux_denoiser(cuda, size)
        reps = 5 if cuda else 1
        for precision in ("bf16", "int8"):
            torch._dynamo.reset()
            release()
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
            rec["forward_s"] = forward_s(run_t, kw, reps)
            if cuda:
                rec["peak_GiB"] = gib(torch.cuda.max_memory_allocated())
                rec["weights_GiB"] = gib(torch.cuda.memory_allocated())
            if precision == "bf16":
                ref = out
            else:
                rec["rel_err_vs_bf16"] = rel(out, ref)
                if cuda:
                    rec["int8_kernels"] = gemm_kernels(run_t, kw)
                    rec["torchao_kernels_seen"] = bool(rec["int8_kernels"])
            run.save()
        res["int8_over_bf16"] = round(res["int8"]["forward_s"] / res["bf16"]["forward_s"], 3)
        res["int8_faster"] = res["int8_over_bf16"] < 1.0

    run.stage(res, body)


SECTIONS = {"flux": flux_section, "qwen": qwen_section, "modfp8": modfp8_section, "int8": int8_section}
