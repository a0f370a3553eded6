"""Run one job locally and print its result: `python -m app run '{"prompt": "..."}'`.

Reads the same environment as the workers (MODEL, OUTPUT_URI, ...); exit 1 when the job failed.
"""

import json
import sys

from app.config import Settings, secret_values
from app.logs import configure_logging
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
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level, secret_values())
    result = Service.load(settings).run(raw, "demo")
    print(json.dumps(result, indent=2))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
