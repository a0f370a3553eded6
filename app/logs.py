"""Logging with loguru: readable locally, JSON lines with LOG_FORMAT=json, secrets scrubbed.

Every line carries the job id (bound with `logger.contextualize(job_id=...)`). The sink scrubs the
final text, tracebacks included: credential values and presigned-URL signatures never get out.
What does not go through loguru (the RunPod SDK prints its own lines, the job result among them,
and uvicorn logs through `logging`) is scrubbed the same way once an entrypoint calls
`scrub_stdio()`: stdout and stderr are wrapped, line by line.
"""

from __future__ import annotations

import atexit
import json
import re
import sys
import threading
from urllib.parse import quote

from loguru import logger

_SIGNED = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|token)=[^&\s\"']+", re.I)
_BEARER = re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.I)  # a reflected Authorization header
_secrets: list[str] = []


def secret_forms(values) -> list[str]:
    """Each value as it may appear in text: itself, JSON-escaped (JSON log lines, error bodies) and
    URL-encoded (a query string); longest first, so a longer form is replaced before its part."""
    forms = {f for s in values or [] if s for f in (s, json.dumps(s)[1:-1], quote(s, safe=""))}
    return sorted(forms, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None, also: list[str] | tuple[str, ...] = ()) -> str:
    """`text` with presigned query values, bearer tokens and secret values replaced: the given
    `secrets` (default: those `configure_logging` was given) plus `also` (each in all its forms)."""
    text = _SIGNED.sub(lambda m: f"{m.group(1)}=REDACTED", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}REDACTED", text)
    values = list(secrets if secrets is not None else _secrets) + (secret_forms(also) if also else [])
    for s in sorted(values, key=len, reverse=True):
        text = text.replace(s, "REDACTED")
    return text


def strip_query(url: str) -> str:
    """A URL without its query string: what may be logged of a presigned URL."""
    return url.split("?", 1)[0]


def report_start_failure(error: Exception, secrets: list[str] | None = None) -> None:
    """A worker that cannot start (a WorkerBroken from settings or load): the one-line message on
    stderr, where a user reads it; the traceback only in the log at DEBUG."""
    logger.opt(exception=error).debug("worker did not start")
    message = getattr(error, "message", None) or str(error)
    print(f"worker did not start: {redact(message, also=secrets or ())}", file=sys.stderr, flush=True)


def configure_logging(fmt: str = "text", level: str = "INFO", secrets: list[str] | None = None, sink=None) -> None:
    """Install the one loguru sink. Call once, from an entrypoint."""
    # JSON lines escape what they carry (non-ASCII, quotes, backslashes): scrub the escaped form too.
    _secrets[:] = secret_forms(secrets)
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


class RedactingStream:
    """A text stream that scrubs what is written through it, one whole line at a time.

    Lines are held until their end (newline or carriage return), so a secret written in two pieces
    is still seen whole; a line longer than `hold` characters is let out scrubbed as it is. What
    is held is let out when the stream is closed or the process exits. Everything else (fileno,
    isatty, encoding, buffer) is the wrapped stream's.
    """

    def __init__(self, stream, hold: int = 64 * 1024):
        self._stream, self._hold = stream, hold
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            cut = max(self._pending.rfind("\n"), self._pending.rfind("\r")) + 1
            if not cut and len(self._pending) > self._hold:
                cut = len(self._pending)
            if cut:
                out, self._pending = self._pending[:cut], self._pending[cut:]
                self._stream.write(redact(out))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()  # a partial line stays held: it may end in the first half of a secret

    def drain(self) -> None:
        """Let out what is held (scrubbed), then flush."""
        with self._lock:
            out, self._pending = self._pending, ""
        try:
            if out:
                self._stream.write(redact(out))
            self._stream.flush()
        except (OSError, ValueError):  # at exit the wrapped stream may be closed already
            pass

    def close(self) -> None:
        self.drain()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def scrub_stdio() -> None:
    """Route sys.stdout and sys.stderr through `redact` (idempotent). For entrypoints that run code
    printing on its own: the RunPod SDK's logger (its `Job result` line holds presigned URLs with
    their session token), its local API server, uvicorn. Call after `configure_logging`."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            wrapped = RedactingStream(stream)
            setattr(sys, name, wrapped)
            atexit.register(wrapped.drain)
