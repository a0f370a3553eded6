"""python -m bench latency [--models flux,sdxl] [--compile regional|full] [--attention fa3|cudnn|native]
python -m bench coldstart ...   (see bench/coldstart.py)
Run on a GPU machine; results land in bench/results/ (and $OUT when set)."""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lat = sub.add_parser("latency", help="stock vs recipe, FLUX and SDXL shapes")
    lat.add_argument("--models", default="flux,sdxl")
    lat.add_argument("--compile", default="regional", choices=["regional", "full", "off"])
    lat.add_argument("--attention", default="fa3", choices=["fa3", "cudnn", "native", "flash"])
    var = sub.add_parser("variants", help="per-step time of recipe variants (FLUX shape)")
    var.add_argument("names", nargs="*", default=["full", "regional_cdt"])
    sub.add_parser("gemm", help="FP8 GEMM paths and FA3 bf16/FP8 attention micro-benchmarks")
    cold = sub.add_parser("coldstart", help="fresh process to first image, with and without compile cache")
    cold.add_argument("--workdir", default="/tmp/coldstart")
    args = ap.parse_args(argv)
    if args.cmd == "latency":
        from bench.latency import main as latency

        latency(tuple(args.models.split(",")), args.compile, args.attention)
    elif args.cmd == "variants":
        from bench.variants import run

        run(args.names)
    elif args.cmd == "gemm":
        from bench.gemm import main as gemm

        gemm()
    elif args.cmd == "coldstart":
        from bench.coldstart import main as coldstart

        coldstart(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
