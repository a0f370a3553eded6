"""RunPod serverless entry: load the worker once, then one job per call.

    python handler.py --test_input '{"input": {"prompt": "a red sneaker on a beach", "seed": 7}}'
"""

import runpod

from app.config import Settings, secret_values
from app.logs import configure_logging
from app.service import Service

settings = Settings.from_env()
configure_logging(settings.log_format, settings.log_level, secret_values())
service = Service.load(settings)  # outside the handler: once per worker, not per job


def handler(job: dict) -> dict:
    """Run one RunPod job; an {"error": ...} result ends it FAILED, a broken worker is replaced."""

    def progress(step: int, total: int) -> None:
        runpod.serverless.progress_update(job, {"step": step, "total": total})

    result = service.run(job.get("input"), job["id"], progress=progress)
    if service.broken:
        result["refresh_worker"] = True
    return result


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
