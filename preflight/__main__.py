"""`python -m preflight [--json] [--cpu]`: check this machine for the configured worker.

Reads the same environment as the workers (MODEL, OUTPUT_URI, PRECISION, DEVICE, CACHE_DIR, ...).
Exit 0 when nothing failed, 1 when a check failed, 2 on bad usage or bad configuration.
Without --cpu (or DEVICE=cpu) this is a GPU check: on a machine without a GPU, `cuda` fails.
An entrypoint like handler.py: it reads the worker's settings (app) and calls the checks, which
themselves take plain arguments and never import app.
"""

from __future__ import annotations

import argparse
import json
import sys

from app.checks import preflight_inputs
from app.config import Settings, secret_values
from app.errors import WorkerBroken
from app.logs import configure_logging, redact
from app.source import resolve


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--cpu", action="store_true", help="CPU mode: skip the GPU checks (the embedded demo model)")
    return p.parse_args(argv)  # argparse exits 2 on bad usage


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    secrets = secret_values()
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_format, settings.log_level, secrets)
        source = resolve(settings.model, settings.revision, settings.hf_offline, settings.weights_uri)
    except WorkerBroken as e:
        print(f"preflight: {redact(e.message, secrets)}", file=sys.stderr)
        return 2
    import preflight

    # The CLI is a GPU check unless told otherwise: DEVICE=auto's "tiny model, no GPU" leniency is for
    # the worker's embedded demo, not for vetting a GPU machine.
    report = preflight.run(preflight_inputs(settings, source), cpu=args.cpu or settings.device == "cpu")
    text = json.dumps(report.to_dict(), indent=2) if args.json else report.table()
    print(redact(text, secrets))  # belt and braces: no check prints a credential, and none gets out
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
