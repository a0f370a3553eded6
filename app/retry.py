"""The one retry loop: capped exponential backoff (full jitter by default), an attempt count and an
optional deadline. Storage (app.storage), the backend client (app.client) and the webhook sender
(app.jobs) all retry through `retry`; each says what is worth retrying (`transient`).

Why our own loop rather than botocore's "standard" retries for storage: the whole unit "PUT, then
HEAD to verify the size" must be retried together (a HEAD that shows a short object means the PUT
must be redone), the backoff must be settable (tests run 200 jobs with faults in seconds), and
botocore's retry quota silently stops retrying after a burst of failures, which would turn a flaky
minute into lost jobs. The S3 client of a store is built with botocore retries off so attempts do
not multiply.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from loguru import logger

T = TypeVar("T")

# HTTP statuses and S3 error codes that mean "try again": the store is overloaded or hiccuped.
TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "BadDigest",
    "IncompleteBody", "ShortWrite",
})


@dataclass(frozen=True)
class Backoff:
    """`attempts` tries in all; before try n+1 sleep uniform(0, min(cap_s, base_s * 2**n)), or exactly
    that bound with `jitter=False` (a single caller, such as one webhook, gains nothing from jitter)."""

    attempts: int = 5
    base_s: float = 0.25
    cap_s: float = 5.0
    jitter: bool = True

    def delay(self, n: int, rng=random) -> float:
        bound = min(self.cap_s, self.base_s * 2**n)
        return rng.uniform(0, bound) if self.jitter else bound


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: 5xx, throttling, connection resets and timeouts."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in TRANSIENT_STATUS or err.get("Code") in TRANSIENT_CODES
    # ConnectionError covers refused/reset/closed connections and connect timeouts;
    # HTTPClientError covers read timeouts and connections closed mid-response.
    return isinstance(exc, (ConnectionError, HTTPClientError, ShortObject))


class ShortObject(Exception):
    """The object read back after an upload is not the size we wrote: write it again."""


class DeadlineExceeded(Exception):
    """The deadline passed before the call succeeded (the last failure, if any, is its __cause__)."""


# Less time than this left: no new attempt (it could not finish), the deadline is reported instead.
MIN_ATTEMPT_S = 0.1


def retry(fn: Callable[[], T], backoff: Backoff, what: str, sleep=time.sleep, deadline: float | None = None,
          transient: Callable[[BaseException], bool] = is_transient,
          on_retry: Callable[[BaseException, int, float], None] | None = None) -> T:
    """Call `fn` until it succeeds, an error `transient` does not accept occurs, or the attempts run
    out (the last error re-raised). `what` names the call in log lines: keep secrets out of it.
    `on_retry(error, attempt, wait)` replaces the default INFO line before each backoff sleep.

    `deadline` (time.monotonic()) bounds the whole: no attempt starts with less than MIN_ATTEMPT_S
    left, and a backoff sleep takes at most half the time left (so a last try still fits);
    DeadlineExceeded then. (Each attempt's own timeouts
    are the caller's to bound: app.storage does it for botocore.)
    """
    for n in range(backoff.attempts):
        if deadline is not None and deadline - time.monotonic() < MIN_ATTEMPT_S:
            raise DeadlineExceeded(f"{what}: out of time before attempt {n + 1}")
        try:
            return fn()
        except Exception as e:
            timed_out = deadline is not None and deadline - time.monotonic() < MIN_ATTEMPT_S
            if timed_out and transient(e):
                raise DeadlineExceeded(f"{what}: out of time after attempt {n + 1} ({type(e).__name__})") from e
            if n + 1 >= backoff.attempts or not transient(e):
                raise
            wait = backoff.delay(n)
            if deadline is not None:  # never sleep away more than half the time left: keep a last try
                wait = max(0.0, min(wait, (deadline - time.monotonic()) / 2))
            if on_retry is not None:
                on_retry(e, n + 1, wait)
            else:
                logger.info("{}: transient {}, retry {}/{} in {:.2f} s", what, type(e).__name__, n + 1,
                            backoff.attempts - 1, wait)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
