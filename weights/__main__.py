"""python -m weights {bake,import,inspect,verify}: the offline side of the weights.

Exit status 0 on success, 2 when the weights are unusable (the error names the tensor or file).
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weights", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bake", help="write a baked directory (denoiser pre-quantized) from a model")
    b.add_argument("--model", required=True, help="hub id, local diffusers directory, or tiny-flux/tiny-sdxl")
    b.add_argument("--revision")
    b.add_argument("--out", required=True)
    b.add_argument("--precision", choices=("fp8", "int8", "bf16"), default="fp8")
    b.add_argument("--device", choices=("cuda", "cpu"), help="where to quantize (default: cuda if present)")
    b.add_argument("--offline", action="store_true", help="no downloads (HF_HUB_OFFLINE semantics)")
    i = sub.add_parser("import", help="convert a single-file FP8 checkpoint (ComfyUI, compressed-tensors)")
    i.add_argument("src")
    i.add_argument("--family", required=True, choices=("flux",))
    i.add_argument("--out", required=True)
    i.add_argument("--config", help="the transformer's config.json (inferred for FLUX.1 geometry if absent)")
    i.add_argument("--base", help="local diffusers directory providing the other components (VAE, encoders)")
    s = sub.add_parser("inspect", help="format, dtypes, quantized layers and scale coverage")
    s.add_argument("path")
    v = sub.add_parser("verify", help="check every file of a baked directory against its manifest")
    v.add_argument("dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from weights.errors import WeightsError

    try:
        if args.command == "bake":
            from weights.bake import bake

            m = bake(args.model, args.out, args.precision, args.revision, args.offline, args.device)
            out = {"out": args.out, "recipe": m["recipe"], "weights_bytes": m["weights_bytes"]}
        elif args.command == "import":
            from weights.importer import import_checkpoint

            m = import_checkpoint(args.src, args.family, args.out, args.config, args.base)
            out = {"out": args.out, "source": m["source"], "quantized_layers": m["recipe"]["quantized_layers"]}
        elif args.command == "inspect":
            from weights.inspect import inspect_path

            out = inspect_path(args.path)
        else:
            from weights.manifest import verify

            out = verify(args.dir)
    except WeightsError as e:
        print(json.dumps({"ok": False, "error": e.type, "message": e.message}), file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str))
    return 0 if out.get("usable", True) else 2


if __name__ == "__main__":
    sys.exit(main())
