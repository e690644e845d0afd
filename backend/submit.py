"""Enqueue a job at most once per job id, so that identical requests share one job.

RQ's `unique=True` refuses a job id while the job's hash exists, and the hash outlives the job: it stays
for the queue's result_ttl after success (30 days for training) and its failure_ttl after a failure. Taken
alone, a duplicate would therefore block a new training run for a month, or turn one failed caption into
a failure served for a day. `submit_once` treats a duplicate as "already there" only while that job is
waiting or running (or, when the caller asks, finished with a result it can reuse); an ended job is
deleted (hash and result stream) and the job is enqueued afresh.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result

from backend.queues import SERIALIZER, enqueue

log = logging.getLogger(__name__)

# Statuses of a job that has not ended yet; any other status means it ended.
PENDING = frozenset(
    {
        JobStatus.CREATED,
        JobStatus.QUEUED,
        JobStatus.STARTED,
        JobStatus.DEFERRED,
        JobStatus.SCHEDULED,
        JobStatus.RATE_LIMITED,
        JobStatus.READY_TO_ENQUEUE,
    }
)

# A job id taken again between our delete and our enqueue (by a concurrent request) is simply shared;
# these attempts only cover the job expiring or being replaced while we look at it.
_ATTEMPTS = 3


def submit_once(
    connection: redis.Redis,
    queue_name: str,
    func_name: str,
    *args: Any,
    job_id: str,
    reuse_finished: bool,
    **kwargs: Any,
) -> tuple[Job, bool]:
    """The job with `job_id`, and whether this call enqueued it.

    An existing job is returned while it is pending, or when `reuse_finished` and it finished with a
    result (its answer is then read at once). Otherwise the old job is deleted and a new one enqueued.
    """
    for _ in range(_ATTEMPTS):
        try:
            job = enqueue(connection, queue_name, func_name, *args, job_id=job_id, unique=True, **kwargs)
            return job, True
        except DuplicateJobError:
            pass
        try:
            existing = Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
        except NoSuchJobError:
            continue  # it expired in between: enqueue again
        status = existing.get_status(refresh=False)
        if status in PENDING:
            return existing, False
        if reuse_finished and status == JobStatus.FINISHED and _has_success(existing):
            return existing, False
        log.info("job %s ended (%s); replacing it", job_id, status.value if status else "no status")
        existing.delete()
    raise RuntimeError(f"could not enqueue job {job_id}: it kept being replaced concurrently")


def finished_return_values(connection: redis.Redis, job_ids: Sequence[str]) -> list[tuple[bool, Any]]:
    """Per job id: (True, return value) when that job finished successfully and its result is still kept.
    One round trip for all the ids, plus one per finished job (its result)."""
    jobs = Job.fetch_many(list(job_ids), connection=connection, serializer=SERIALIZER)
    return [_success_value(job) for job in jobs]


def _success_value(job: Job | None) -> tuple[bool, Any]:
    if job is None or job.get_status(refresh=False) != JobStatus.FINISHED:
        return False, None
    result = job.latest_result()
    if result is None or result.type != Result.Type.SUCCESSFUL:
        return False, None
    return True, result.return_value


def _has_success(job: Job) -> bool:
    result = job.latest_result()
    return result is not None and result.type == Result.Type.SUCCESSFUL
