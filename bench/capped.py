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
import time

from bench.capped_sections import SECTIONS, Run

__all__ = ["SECTIONS", "main"]


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
