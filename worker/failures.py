"""Which job failures are worth another attempt.

RQ re-runs a job that raised whenever the job carries `Retry` (the prelabel and train queues do), whatever it
raised. A retry helps only when the cause may pass: an image host or Label Studio that timed out or answered
5xx/429, a Redis connection that dropped. An input that is wrong (a zero-area box, a file that is not an
image, a URL outside the allow-list) fails the same way every time, and each retry of a bulk job would hold
a GPU for nothing. The worker asks `is_transient` and fails everything else at once.
"""

from __future__ import annotations

import redis
import requests

from backend.images import ImageUnavailable
from backend.ls_client import LabelStudioError

# Exceptions whose cause lies outside the job and may be gone on the next attempt.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ImageUnavailable,
    redis.ConnectionError,
    redis.TimeoutError,
    requests.ConnectionError,
    requests.Timeout,
    ConnectionError,  # the builtin one: refused, reset, broken pipe
)


def is_transient(error: BaseException) -> bool:
    """True when a later attempt may succeed: the failure lies with a service, not with the job's input."""
    if isinstance(error, LabelStudioError):
        status = error.status_code
        return status is None or status == 429 or status >= 500
    return isinstance(error, TRANSIENT_ERRORS)
