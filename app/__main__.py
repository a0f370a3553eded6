"""Run one job locally and print its result: `python -m app run '{"prompt": "..."}'`.

Reads the same environment as the workers (MODEL, OUTPUT_URI, ...); exit 1 when the job failed,
2 when the worker could not start (bad configuration, preflight, weights).
"""

import json
import sys

from loguru import logger

from app.config import Settings, secret_values
from app.errors import WorkerBroken
from app.logs import configure_logging, redact
from app.service import Service


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "run":
        print("usage: python -m app run '{\"prompt\": \"...\"}'", file=sys.stderr)
        return 2
    try:
        raw = json.loads(argv[1])
    except json.JSONDecodeError as e:
        print(f"job input is not JSON: {e}", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
    except WorkerBroken as e:
        print(f"worker did not start: {redact(e.message, secret_values())}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level, secret_values())
    try:
        service = Service.load(settings)
    except WorkerBroken as e:  # a refusal at start: its message, not a traceback (that goes to the log)
        logger.opt(exception=e).debug("worker did not start")
        print(f"worker did not start: {redact(e.message, secret_values())}", file=sys.stderr)
        return 2
    result = service.run(raw, "demo")
    print(json.dumps(result, indent=2))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
