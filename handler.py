"""RunPod serverless entry: load the worker once, then one job per call.

    python handler.py --test_input '{"input": {"prompt": "a red sneaker on a beach", "seed": 7}}'
    python handler.py --rp_serve_api --rp_api_port 8000      # the SDK's local API server

A failed job returns RunPod's `{"error": "<string>"}`: our typed error `{"type", "message",
"field"?}` as compact JSON (app.jobs.error_text), which the SDK's local server accepts (it wants a
string) and app.client parses back.
"""

import os

# The SDK logs every job's input and output at DEBUG, its default level: prompts and presigned URLs
# would land in the worker's log. Read once when runpod is imported, so it is set before.
os.environ.setdefault("RUNPOD_DEBUG_LEVEL", "INFO")

import runpod  # noqa: E402
from runpod.serverless.modules.rp_logger import RunPodLogger  # noqa: E402

from app.config import Settings, secret_values
from app.errors import WorkerBroken
from app.jobs import error_text
from app.logs import configure_logging, report_start_failure, scrub_stdio
from app.service import Service

# The variable above is read only when runpod is first imported, and RUNPOD_LOG_LEVEL overrides it:
# hold the level at INFO whatever was imported or set before (DEBUG prints presigned URLs with their
# signature, access key id and session token).
RunPodLogger().set_level("INFO")
try:
    settings, broken = Settings.from_env(), None
except WorkerBroken as e:  # a bad setting: reported below like a failed load, never as a traceback
    settings, broken = None, e
configure_logging(settings.log_format if settings else "text", settings.log_level if settings else "INFO",
                  secret_values())
# The SDK prints on its own (`Job result: {...}` in --test_input mode holds the presigned URLs, with
# X-Amz-Credential, -Signature and -Security-Token; --rp_log_level DEBUG prints every output): all of
# stdout/stderr goes through the same scrubber as our log lines, in every SDK mode.
scrub_stdio()
# Progress updates are POSTed to the job-done URL RunPod sets in a worker; without one (--test_input,
# --rp_serve_api) every update is an ERROR line ("Failed to return job results"), so none are sent.
PROGRESS = os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT") not in (None, "", "JOB_DONE_URL")
service = None
if broken is None:
    try:
        service = Service.load(settings)  # once per worker; preflight runs before any weight is read
    except WorkerBroken as e:
        broken = e
if broken is not None:  # the one-line refusal; its traceback only at DEBUG
    report_start_failure(broken, secret_values())


@runpod.serverless.register_fitness_check
def preflight_passed() -> None:
    """RunPod runs this before taking jobs: a worker that failed preflight exits 1 and is replaced."""
    if broken is not None:
        raise broken


def handler(job: dict) -> dict:
    """Run one RunPod job; an {"error": "..."} result ends it FAILED, a broken worker is replaced."""
    if service is None:  # only reachable locally (--test_input): fitness checks run on RunPod only
        return {"error": error_text(broken.to_dict()), "refresh_worker": True}

    def progress(step: int, total: int) -> None:
        runpod.serverless.progress_update(job, {"step": step, "total": total})

    result = service.run(job.get("input"), job["id"], progress=progress if PROGRESS else None)
    if "error" in result:
        result = {"error": error_text(result["error"])}  # RunPod's contract: a string
    if service.broken:
        result["refresh_worker"] = True
    return result


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
