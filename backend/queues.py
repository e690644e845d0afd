"""The job queues: names, priorities, timeouts, retry policy, result lifetimes, and how to wait for a result.

Everything about RQ that the backend and the worker must agree on lives here. The backend enqueues jobs by
their dotted name ("worker.jobs.describe_regions") and never imports worker code. Payloads and results are
JSON (`SERIALIZER`), so the worker must be started with the same serializer.

Queues, in the order a worker serves them (RQ takes the first non-empty queue in the list it listens to):

* `interactive`: a person in Label Studio waits for the answer. Short timeout, no retry: a retry after a
  crash arrives long after the person has given up (RQ notices an abandoned job after 90 s or more).
* `prelabel`: bulk pre-annotation. Retried, because a worker that dies mid-batch must not lose the work.
* `train`: fine-tuning. Hours long; retried once (e.g. the machine was preempted).

Retry (reliability.md §1.2): RQ re-runs a job only when it carries `Retry`. The queue's `retry` is attached
at enqueue and covers a worker that died under the job (killed, OOM, machine lost) and any exception the job
raises; RQ cannot tell transient from permanent exceptions, so job functions should not raise for input that
will never work, and a job that detects a transient failure can also return `Retry` itself. Intervals stay 0:
a delayed retry needs an RQ scheduler process, and without one the job would wait forever.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from backend.settings import Settings, SettingsError

log = logging.getLogger(__name__)

INTERACTIVE = "interactive"
PRELABEL = "prelabel"
TRAIN = "train"

# Highest priority first: the order a worker listens to its queues in.
PRIORITY_ORDER: tuple[str, ...] = (INTERACTIVE, PRELABEL, TRAIN)

SERIALIZER = JSONSerializer

# wait_for_result blocks on Redis in slices no longer than this; the client's socket timeout stays above it
# (a blocking read longer than the socket timeout fails with TimeoutError, reliability.md §1.2).
MAX_BLOCK_S = 5.0
SOCKET_TIMEOUT_S = MAX_BLOCK_S + 10.0

HOUR = 3600
DAY = 24 * HOUR


@dataclass(frozen=True)
class QueueSpec:
    name: str
    job_timeout: int  # seconds a job may run before RQ stops it
    result_ttl: int  # seconds a successful result is kept
    failure_ttl: int  # seconds a failed job (and its hash: it blocks a unique job_id) is kept
    retry: Retry | None


QUEUES: dict[str, QueueSpec] = {
    spec.name: spec
    for spec in (
        QueueSpec(INTERACTIVE, job_timeout=60, result_ttl=5 * 60, failure_ttl=DAY, retry=None),
        QueueSpec(PRELABEL, job_timeout=15 * 60, result_ttl=DAY, failure_ttl=7 * DAY, retry=Retry(max=2)),
        QueueSpec(
            TRAIN, job_timeout=12 * HOUR, result_ttl=30 * DAY, failure_ttl=30 * DAY, retry=Retry(max=1)
        ),
    )
}

_FINAL_FAILURES = {
    Result.Type.FAILED: "failed",
    Result.Type.STOPPED: "was stopped",
    Result.Type.MAX_RETRIES_EXCEEDED: "gave up after its retries",
}


class JobError(Exception):
    """A job did not deliver a result."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobFailed(JobError):
    """The job ended without a result; `reason` is the job's exception as one line ("ValueError: bad box")."""

    def __init__(self, job_id: str, reason: str, exc_string: str | None = None) -> None:
        super().__init__(job_id, f"job {job_id} failed: {reason}")
        self.reason = reason
        self.exc_string = exc_string  # the whole traceback, for logs


class JobTimeout(JobError, TimeoutError):
    """No final result arrived before the deadline (the job may still finish later)."""

    def __init__(self, job_id: str, timeout_s: float) -> None:
        super().__init__(job_id, f"job {job_id} gave no result within {timeout_s:g} s")
        self.timeout_s = timeout_s


def spec(queue_name: str) -> QueueSpec:
    try:
        return QUEUES[queue_name]
    except KeyError:
        raise ValueError(f"unknown queue {queue_name!r}; the queues are {', '.join(QUEUES)}") from None


def connect(settings: Settings) -> redis.Redis:
    """A Redis client for RQ: bytes responses, bounded socket waits, retries across a short Redis outage."""
    return redis.Redis.from_url(
        redis_url(settings),
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        # About 10 s of reconnect attempts: enough for a Redis restart, short enough for a waiting person.
        retry=RedisRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=8),
    )


def redis_url(settings: Settings) -> str:
    """REDIS_URL; SettingsError when it is not set (nothing here starts a Redis)."""
    if not settings.redis_url:
        raise SettingsError(
            "REDIS_URL is not set: point it at your Redis (for development: python -m devstack.redis_server, "
            "or make demo, which starts everything)"
        )
    return settings.redis_url


def get_queue(name: str, connection: redis.Redis) -> Queue:
    return Queue(name, connection=connection, default_timeout=spec(name).job_timeout, serializer=SERIALIZER)


def enqueue(
    connection: redis.Redis,
    queue_name: str,
    func_name: str,
    *args: Any,
    job_id: str | None = None,
    unique: bool = False,
    meta: dict | None = None,
    **kwargs: Any,
) -> Job:
    """Enqueue the job function `func_name` (a dotted name) with JSON arguments under the queue's policy.

    `unique=True` (needs `job_id`, made of letters, digits, '_' and '-') raises rq.exceptions.DuplicateJobError
    while a job with that id exists. `kwargs` go to the job function unchanged (none are taken by RQ).
    """
    _check_dotted_name(func_name)
    queue_spec = spec(queue_name)
    return get_queue(queue_name, connection).enqueue_call(
        func=func_name,
        args=args,
        kwargs=kwargs,
        timeout=queue_spec.job_timeout,
        result_ttl=queue_spec.result_ttl,
        failure_ttl=queue_spec.failure_ttl,
        retry=queue_spec.retry,
        job_id=job_id,
        unique=unique,
        meta=meta,
    )


def wait_for_result(job: Job, timeout_s: float) -> Any:
    """The job's return value once it succeeds; JobFailed when it ends otherwise; JobTimeout at the deadline.

    A job's results form a Redis stream: a retried job first gets RETRIED entries, then its final one.
    `job.latest_result(timeout=)` reads that stream from the start, so it returns an existing RETRIED entry
    at once, again and again; here we block only for entries after the last one seen, and take the first
    final entry in stream order.
    """
    deadline = time.monotonic() + timeout_s
    stream = Result.get_key(job.id)
    last_seen = "0-0"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise JobTimeout(job.id, timeout_s)
        block_ms = max(1, int(min(remaining, MAX_BLOCK_S) * 1000))
        response = job.connection.xread({stream: last_seen}, block=block_ms)
        for entry_id, payload in response[0][1] if response else ():
            last_seen = entry_id
            result = Result.restore(
                job.id, entry_id.decode(), payload, connection=job.connection, serializer=job.serializer
            )
            if result.type == Result.Type.SUCCESSFUL:
                return result.return_value
            if result.type in _FINAL_FAILURES:
                raise JobFailed(job.id, _reason(result), result.exc_string)
            log.debug("job %s: %s result, waiting for the next one", job.id, result.type.name)


def _reason(result: Result) -> str:
    """The exception line(s) at the end of a traceback, or RQ's own message when there is no traceback."""
    if not result.exc_string:
        return _FINAL_FAILURES[result.type]
    lines = result.exc_string.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return " ".join(line.strip() for line in lines)
    after_frames = [line for line in lines[starts[-1] + 1 :] if line and not line[0].isspace()]
    return " ".join(after_frames) or lines[-1].strip()


def _check_dotted_name(func_name: str) -> None:
    parts = func_name.split(".") if isinstance(func_name, str) else []
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise ValueError(
            f"job function must be a dotted name like 'worker.jobs.describe_regions', got {func_name!r}"
        )
