"""Run the worker locally, from the same environment as the platforms (MODEL, OUTPUT_URI, ...):

    python -m app run '{"prompt": "..."}'     one job, its result printed; exit 1 when the job failed
    python -m app serve [--port 8000]          the jobs API (RunPod's routes, as on Modal) over this
                                               process, behind API_TOKEN: ModalJobs / runpod.Endpoint
                                               pointed at http://127.0.0.1:PORT

Exit 2 when the worker could not start (bad configuration, preflight, weights).
"""

import argparse
import json
import os
import sys

from app.config import Settings, secret_values
from app.errors import WorkerBroken
from app.logs import configure_logging, report_start_failure
from app.service import Service


def _start() -> Service | None:
    """The loaded service, or None after a one-line refusal (the traceback goes to the log at DEBUG)."""
    try:
        settings = Settings.from_env()
    except WorkerBroken as e:
        configure_logging(secrets=secret_values())  # no LOG_LEVEL to read: INFO, so no traceback
        report_start_failure(e, secret_values())
        return None
    configure_logging(settings.log_format, settings.log_level, secret_values())
    try:
        return Service.load(settings)
    except WorkerBroken as e:
        report_start_failure(e, secret_values())
        return None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run one job, print its result").add_argument("input", help="the job input as JSON")
    s = sub.add_parser("serve", help="serve the jobs API on this machine (token from API_TOKEN)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    if args.cmd == "run":
        try:
            raw = json.loads(args.input)
        except json.JSONDecodeError as e:
            print(f"job input is not JSON: {e}", file=sys.stderr)
            return 2
    token = os.environ.get("API_TOKEN", "")
    if args.cmd == "serve" and len(token) < 16:  # before the load: the API never runs open
        print("API_TOKEN must be set to a secret of at least 16 characters", file=sys.stderr)
        return 2
    service = _start()
    if service is None:
        return 2
    if args.cmd == "run":
        result = service.run(raw, "demo")
        print(json.dumps(result, indent=2))
        return 1 if "error" in result else 0
    import uvicorn

    from app.jobs_api import ThreadBackend, create_app

    backend = ThreadBackend(service.run)
    try:
        uvicorn.run(create_app(backend, token), host=args.host, port=args.port, log_level="warning")
    finally:
        backend.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
