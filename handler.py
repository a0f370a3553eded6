"""RunPod serverless entry: load the worker once, then one job per call.

    python handler.py --test_input '{"input": {"prompt": "a red sneaker on a beach", "seed": 7}}'
"""

import os

# The SDK logs every job's input and output at DEBUG, its default level: prompts and presigned URLs
# would land in the worker's log. Read once when runpod is imported, so it is set before.
os.environ.setdefault("RUNPOD_DEBUG_LEVEL", "INFO")

import runpod  # noqa: E402
from runpod.serverless.modules.rp_logger import RunPodLogger  # noqa: E402

from app.config import Settings, secret_values
from app.errors import WorkerBroken
from app.logs import configure_logging
from app.service import Service

# The variable above is read only when runpod is first imported, and RUNPOD_LOG_LEVEL overrides it:
# hold the level at INFO whatever was imported or set before (DEBUG prints presigned URLs with their
# signature, access key id and session token).
RunPodLogger().set_level("INFO")
settings = Settings.from_env()
configure_logging(settings.log_format, settings.log_level, secret_values())
try:
    service, broken = Service.load(settings), None  # once per worker; preflight runs before any weight is read
except WorkerBroken as e:
    service, broken = None, e


@runpod.serverless.register_fitness_check
def preflight_passed() -> None:
    """RunPod runs this before taking jobs: a worker that failed preflight exits 1 and is replaced."""
    if broken is not None:
        raise broken


def handler(job: dict) -> dict:
    """Run one RunPod job; an {"error": ...} result ends it FAILED, a broken worker is replaced."""
    if service is None:  # only reachable locally (--test_input): fitness checks run on RunPod only
        return {"error": broken.to_dict(), "refresh_worker": True}

    def progress(step: int, total: int) -> None:
        runpod.serverless.progress_update(job, {"step": step, "total": total})

    result = service.run(job.get("input"), job["id"], progress=progress)
    if service.broken:
        result["refresh_worker"] = True
    return result


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
