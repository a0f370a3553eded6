"""python -m weights {bake,import,inspect,verify}: the offline side of the weights.

Exit status 0 on success, 2 when the weights are unusable (the error names the tensor or file).
An entrypoint: `bake` and `import` resolve the model and its family through the worker (app); the
library modules of this package never import app.
"""

from __future__ import annotations

import argparse
import json
import sys

from weights import lora


def _importable() -> list[str]:
    from app.families import FAMILIES

    return sorted(name for name, fam in FAMILIES.items() if fam.checkpoint_keys is not None)


OUT_HELP = ("the baked directory to write. It must be absent, empty, or a previous bake (its manifest.json "
            "lists every file in it): the result is written beside it and swapped in when complete, and a "
            "failed run leaves nothing behind; any other folder is refused (nothing is ever deleted)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weights", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bake", help="write a baked directory (denoiser pre-quantized) from a model")
    b.add_argument("--model", required=True, help="hub id, local diffusers directory, or tiny-flux/tiny-sdxl")
    b.add_argument("--revision")
    b.add_argument("--out", required=True, help=OUT_HELP)
    b.add_argument("--precision", choices=("fp8", "int8", "bf16"), default="fp8")
    b.add_argument("--device", choices=("cuda", "cpu"), help="where to quantize (default: cuda if present)")
    b.add_argument("--text-encoders", choices=("bf16", "fp8"), default="bf16",
                   help="fp8: the text encoders' repeated-layer linears stored FP8 too (what TEXT_ENCODERS=fp8 runs)")
    b.add_argument("--offline", action="store_true", help="no downloads (HF_HUB_OFFLINE semantics)")
    lora.add_arguments(b)  # --fuse-lora [EXPERT=]FILE --lora-scale [EXPERT=]S --steps N --guidance G
    i = sub.add_parser("import", help="convert a single-file FP8 checkpoint (ComfyUI, compressed-tensors)")
    i.add_argument("src", nargs="+", metavar="[EXPERT=]FILE",
                   help="the checkpoint; a model with several denoisers takes one file per expert: "
                        "high=FILE low=FILE (Wan 2.2 A14B's high / low noise experts)")
    i.add_argument("--family", required=True, choices=_importable(),
                   help="the model family whose single-file key names the checkpoint uses")
    i.add_argument("--out", required=True, help=OUT_HELP)
    i.add_argument("--config", help="the transformer's config.json (inferred from the tensor shapes if absent)")
    i.add_argument("--base", help="local diffusers directory providing the other components (VAE, encoders)")
    s = sub.add_parser("inspect", help="format, dtypes, quantized layers and scale coverage")
    s.add_argument("path")
    v = sub.add_parser("verify", help="check every file of a baked directory against its manifest")
    v.add_argument("dir")
    return p


def bake(model: str, out: str, precision: str = "fp8", revision: str | None = None, offline: bool = False,
         device: str | None = None, text_encoders: str = "bf16", **fuse) -> dict:
    """Bake MODEL (hub id, diffusers folder, tiny-<family>) into `out`; return the manifest.
    `fuse`: weights.lora.bake_extra's options (a LoRA fused first, the bake's own defaults)."""
    from app.loading import source_pipeline
    from app.source import resolve
    from weights import outdir
    from weights.bake import bake_pipeline

    outdir.check(out)  # before any download or quantization

    source = resolve(model, revision, offline)
    pipe = source_pipeline(source)
    return bake_pipeline(pipe, source.family, out, precision, {"id": source.id, "revision": source.revision}, device,
                         lora.bake_extra(pipe, source.family, **fuse), text_encoders)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from app.errors import WorkerBroken
    from weights.errors import WeightsError

    try:
        if args.command == "bake":
            m = bake(args.model, args.out, args.precision, args.revision, args.offline, args.device,
                     args.text_encoders, **lora.options(args))
            out = {"out": args.out, "recipe": m["recipe"], "weights_bytes": m["weights_bytes"]}
        elif args.command == "import":
            from app.families import family_named
            from weights.importer import import_checkpoint

            m = import_checkpoint(args.src, family_named(args.family), args.out, args.config, args.base)
            out = {"out": args.out, "source": m.get("sources") or m["source"],
                   "quantized_layers": m["recipe"]["quantized_layers"]}
        elif args.command == "inspect":
            from weights.inspection import inspect_path

            out = inspect_path(args.path)
        else:
            from weights.manifest import verify

            out = verify(args.dir)
    except (WeightsError, WorkerBroken) as e:
        print(json.dumps({"ok": False, "error": e.type, "message": e.message}), file=sys.stderr)
        return 2
    except OSError as e:  # a path the command cannot read or write: a refusal, not a traceback
        print(json.dumps({"ok": False, "error": "os_error", "message": f"{e.filename or ''}: {e.strerror or e}"}),
              file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str))
    return 0 if out.get("usable", True) else 2


if __name__ == "__main__":
    sys.exit(main())
