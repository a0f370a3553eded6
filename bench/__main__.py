"""python -m bench latency [--models flux,sdxl] [--compile regional|full] [--attention fa3|cudnn|native]
                         [--out DIR] [--tiny --size 64 --steps 2]   (--tiny: app.tiny's models, e.g. on a CPU)
python -m bench coldstart [--tiny] [--budget 570] [--dynamic off|auto|all] [--runs ...]   (see bench/coldstart.py)
python -m bench cost | capped [--tiny]   (price per image by GPU class; FLUX, Qwen-Image-Edit-Plus under a 24 GB cap, INT8)
python -m bench lora [--tiny]   (per-job LoRA on FP8 FLUX through Service: plain vs LoRA vs switching)
python -m bench aot_probe   (AOTInductor package load, stage by stage, and the precompile switches)
python -m bench video [--steps 3] [--tiny]   (see bench/video.py)
python -m bench edit [--sections ...] [--budget S] [--tiny]   (see bench/edit.py, bench/edit_e2e.py)
Run on a GPU machine; results land in bench/results/ (and $OUT when set)."""

import argparse
import sys

RUNS = ("no_cache", "warm_cache", "cold_disk")  # bench.coldstart's fresh-process runs (kept light: no import)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lat = sub.add_parser("latency", help="stock vs recipe, FLUX and SDXL shapes")
    lat.add_argument("--models", default="flux,sdxl")
    lat.add_argument("--compile", default="regional", choices=["regional", "full", "off"])
    lat.add_argument("--attention", default="fa3", choices=["fa3", "fa3_fp8", "cudnn", "native", "flash"])
    lat.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                     help="app.cudagraphs around the denoiser (auto: the family's default, as the worker)")
    lat.add_argument("--fuse-gelu-quant", choices=["on", "off"], default="on",
                     help="app.fused's one-pass GELU+FP8 kernel (on: as the worker's FP8 recipe)")
    lat.add_argument("--inductor", action="append", default=[], metavar="NAME=INT",
                     help="an inductor config value for this run, e.g. realize_opcount_threshold=100")
    lat.add_argument("--profile", default="flux", help="models to profile one step of (on CUDA); '' for none")
    lat.add_argument("--out", default="bench/results", help="folder for the JSON and PNG (and $OUT when set)")
    lat.add_argument("--tiny", action="store_true", help="app.tiny's models instead of the full-size ones")
    lat.add_argument("--size", type=int, default=1024)
    lat.add_argument("--steps", type=int, default=None, help="default: 28 (FLUX), 30 (SDXL)")
    var = sub.add_parser("variants", help="per-step time of recipe variants (FLUX shape)")
    var.add_argument("names", nargs="*", default=["regional", "regional_fused"])
    var.add_argument("--profile", action="store_true", help="also profile one step of each variant")
    sub.add_parser("gemm", help="FP8 GEMM paths and FA3 bf16/FP8 attention micro-benchmarks")
    qk = sub.add_parser("quant", help="the FP8 activation quantizer as Inductor fuses it, and app.fused's kernel")
    qk.add_argument("--fused-only", action="store_true", help="only app.fused's kernel against Inductor's fusion")
    ed = sub.add_parser("edit", help="Qwen-Image-Edit CFG step (20B transformer): stock vs recipe variants")
    ed.add_argument("variants", nargs="*", default=None, help="cfg_step's variants; default: all (see bench/edit.py)")
    ed.add_argument("--sections", default="plus_e2e,kontext_vs_flux,text_encoder_fp8,cfg_step",
                    help="which sections, in this order (bench/edit_e2e.py, bench/edit.py)")
    ed.add_argument("--budget", type=float, default=420.0, help="seconds after which later sections are skipped")
    ed.add_argument("--out", default="bench/results")
    ed.add_argument("--tiny", action="store_true", help="the families' tiny random models (CPU plumbing check)")
    vid = sub.add_parser("video", help="Wan 2.1 I2V 14B at 480p/720p, 81 frames: stock vs recipe, VAE, MP4, 4-step e2e")
    vid.add_argument("--steps", type=int, default=3, help="timed CFG steps per size (after one warm step)")
    vid.add_argument("--budget", type=float, default=520.0,
                     help="seconds (from the start of the bench, after imports) past which no section starts: each is skipped when its rough H200 estimate would overrun")
    vid.add_argument("--out", default="bench/results")
    vid.add_argument("--tiny", action="store_true", help="the family's tiny random model (CPU plumbing check)")
    enc = sub.add_parser("encode", help="output encode cost: PNG levels, JPEG, WEBP on a photo and on noise (CPU)")
    enc.add_argument("--size", type=int, default=1024)
    wp = sub.add_parser("warmpath", help="FLUX warm path: step caches, text-embedding cache, T5 length buckets")
    wp.add_argument("--tiny", action="store_true")
    wp.add_argument("--size", type=int, default=1024)
    wp.add_argument("--steps", type=int, default=None)
    wp.add_argument("--out", default="bench/results")
    cold = sub.add_parser("coldstart", help="fresh process to first image, with and without compile cache")
    cold.add_argument("--workdir", default="/tmp/coldstart")
    cold.add_argument("--baked", default=None, help="an existing baked folder (else one is baked first)")
    cold.add_argument("--tiny", action="store_true", help="the embedded tiny model on the CPU (plumbing only)")
    cold.add_argument("--budget", type=float, default=570.0, help="seconds for the whole command; later rows/runs skip")
    cold.add_argument("--runs", default=",".join(RUNS), help=f"fresh-process runs, in order (of {', '.join(RUNS)})")
    cold.add_argument("--table-in", default="warm_cache", help="the run that also times the first-jobs table ('' none)")
    cold.add_argument("--dynamic", choices=["off", "auto", "all"], default=None, help="DYNAMIC for the worker")
    cold.add_argument("--num-images", default="1,2,3,4", help="num_images per size in the table")
    cold.add_argument("--off-bucket", default=None, help="the table's off-bucket sizes, WxH,WxH (default: two)")
    cold.add_argument("--steps", type=int, default=None, help="steps per table job (default: the family's)")
    cold.add_argument("--shapes", default=None, help="SHAPES for the worker (default: the family's buckets)")
    cold.add_argument("--out", default="bench/results")
    sub.add_parser("cost", help="USD per image by GPU class (no GPU needed; see bench/cost.py)", add_help=False)
    sub.add_parser("capped", help="FLUX and Qwen-Image-Edit-Plus under a 23.5 GiB cap through Service, INT8 vs bf16 (see bench/capped.py)", add_help=False)
    sub.add_parser("lora", help="per-job LoRA on FP8 FLUX: plain vs LoRA vs switching (see bench/lora.py)",
                   add_help=False)
    sub.add_parser("aot_probe", help="why aoti_load_package crashes here, stage by stage (see bench/aot_probe.py)",
                   add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("cost", "capped", "lora", "aot_probe"):  # these parse their own arguments
        import importlib

        return importlib.import_module(f"bench.{argv[0]}").main(argv[1:])
    args = ap.parse_args(argv)
    if args.cmd == "latency":
        from bench.latency import main as latency

        builders = None
        if args.tiny:
            from app.families import FAMILIES

            builders = {name: fam.build_tiny for name, fam in FAMILIES.items()}
        res = latency(tuple(args.models.split(",")), args.compile, args.attention, args.out, builders, args.size,
                args.steps, cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs],
                inductor=dict(kv.split("=", 1) for kv in args.inductor),
                fuse_gelu_quant=args.fuse_gelu_quant == "on", profile=tuple(args.profile.split(",")))
        failed = [m for m in args.models.split(",") if "error" in res.get(m, {})]
        if failed:
            print(f"bench latency: failed for {', '.join(failed)}: " +
                  "; ".join(res[m]["error"] for m in failed), file=sys.stderr)
            return 1
    elif args.cmd == "variants":
        from bench.variants import run

        run(args.names, args.profile)
    elif args.cmd == "gemm":
        from bench.gemm import main as gemm

        gemm()
    elif args.cmd == "quant":
        from bench.quant_kernel import main as quant

        quant(only_fused=args.fused_only)
    elif args.cmd == "edit":
        from bench.edit import VARIANTS, main as edit

        res = edit(tuple(args.variants or VARIANTS), args.out, tiny=args.tiny, budget_s=args.budget,
                   sections=tuple(args.sections.split(",")))
        failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
        if failed:
            print(f"bench edit: failed: {', '.join(failed)}", file=sys.stderr)
            return 1
    elif args.cmd == "video":
        from bench.video import main as video

        res = video(args.steps, args.out, args.tiny, args.budget)
        failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
        if failed:
            print(f"bench video: failed: {', '.join(failed)}", file=sys.stderr)
            return 1
    elif args.cmd == "encode":
        from bench.encode import main as encode

        encode(args.size)
    elif args.cmd == "warmpath":
        from bench.warmpath import main as warmpath

        warmpath(args.tiny, args.size, args.steps, args.out)
    elif args.cmd == "coldstart":
        from app.config import parse_shapes
        from bench.coldstart import main as coldstart

        runs = [r for r in args.runs.split(",") if r]
        unknown = sorted(set(runs) - set(RUNS))
        if unknown:
            ap.error(f"--runs: unknown {', '.join(unknown)} (of {', '.join(RUNS)})")
        res = coldstart(args.workdir, args.baked, args.tiny, args.budget, runs, args.table_in or None, args.dynamic,
                        tuple(int(n) for n in args.num_images.split(",")),
                        parse_shapes(args.off_bucket) if args.off_bucket else None, args.steps, args.shapes, args.out)
        failed = [r for r in runs if isinstance(res.get(r), dict) and (res[r].get("error") or "rc" in res[r])]
        if failed:
            print(f"bench coldstart: failed: {', '.join(failed)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
