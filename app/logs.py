"""Logging with loguru: readable locally, JSON lines with LOG_FORMAT=json, secrets scrubbed.

Every line carries the job id (bound with `logger.contextualize(job_id=...)`). The sink scrubs the
final text, tracebacks included: credential values and presigned-URL signatures never get out.
"""

from __future__ import annotations

import json
import re
import sys

from loguru import logger

_SIGNED = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|token)=[^&\s\"']+", re.I)
_secrets: list[str] = []


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with presigned query values and the given (or configured) secret values replaced."""
    text = _SIGNED.sub(lambda m: f"{m.group(1)}=REDACTED", text)
    for s in secrets if secrets is not None else _secrets:
        text = text.replace(s, "REDACTED")
    return text


def strip_query(url: str) -> str:
    """A URL without its query string: what may be logged of a presigned URL."""
    return url.split("?", 1)[0]


def configure_logging(fmt: str = "text", level: str = "INFO", secrets: list[str] | None = None, sink=None) -> None:
    """Install the one loguru sink. Call once, from an entrypoint."""
    # JSON lines escape what they carry (non-ASCII, quotes, backslashes): scrub the escaped form too.
    forms = {f for s in secrets or [] for f in (s, json.dumps(s)[1:-1])}
    _secrets[:] = sorted(forms, key=len, reverse=True)
    out = sink or sys.stderr

    def write(message: str) -> None:
        out.write(redact(str(message)))
        out.flush() if hasattr(out, "flush") else None

    logger.remove()
    logger.configure(extra={"job_id": "-"})
    if fmt == "json":
        logger.add(write, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(write, level=level, backtrace=False, diagnose=False, colorize=False,
                   format="{time:HH:mm:ss.SSS} {level: <7} [{extra[job_id]}] {message}")
    quiet_libraries()


# Library loggers whose import-time notices are noise for a worker, not its operator's business: torchao's
# optional CUDA/Triton extensions (FP8 runs on our own FP8Linear), torch's _pytree deprecation notes on
# torchao's enums, and diffusers/transformers (their warnings can quote prompt text, and the
# "modules that should be kept in float32: []" note on every tiny build). Errors still show.
QUIET = ("torchao", "torch.utils._pytree", "diffusers", "transformers")


def quiet_libraries() -> None:
    import logging
    import os

    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):  # read when each library sets its own level
        os.environ.setdefault(var, "error")
