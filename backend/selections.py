"""Bulk pre-labeling of a selection of any size: chunks on the prelabel queue, progress, cancel.

"Retrieve predictions" on more tasks than the backend answers inline becomes a *selection*: its task ids
cut into chunks of `chunk_tasks`, each its own `prelabel_chunk` job on the prelabel queue, so every worker
of the fleet takes a share, peak memory depends on the chunk and not on the selection, a chunk that dies
is re-run alone (RQ's lease and Retry; it skips what is written already), and predictions appear in Label
Studio chunk by chunk. Planning costs a constant number of Redis round trips per chunk (`Job.fetch_many`,
one pipeline for all new chunks), whatever the selection's size.

Redis keys, for a selection id ``sel-<project>-<digest of its task ids>``:

* ``roi:selection:<id>``: hash: project, total, chunks, created_at, cancelled, and the counters the chunks
  add when they end: done (predicted or skipped with a reason) and failed.
* ``roi:selection:<id>:failures``: hash: reason -> number of tasks.
* ``roi:selection:<id>:ended``: set of the chunks that have ended (each is counted once, retries or not).
* ``roi:project:<id>:selection``: the project's latest selection.
* ``roi:prediction:<project>:<task>:<version>``: the chunk that writes that task's prediction (see
  `claim_prediction`).

The same selection asked for again while it runs (Label Studio repeats a call that timed out) is the same
selection: no chunk is enqueued twice.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import redis
from rq.job import Callback, Job, JobStatus

from backend.queues import PRELABEL, SERIALIZER, get_queue, spec
from backend.submit import PENDING

PREFIX = "roi:selection:"
KEPT_S = 7 * 24 * 3600  # how long a selection's record stays readable after it was planned


def selection_id(project_id: int, task_ids: Sequence[int]) -> str:
    digest = hashlib.sha256(",".join(str(t) for t in sorted(set(task_ids))).encode()).hexdigest()
    return f"sel-{project_id}-{digest[:20]}"


def chunk_job_id(selection: str, index: int) -> str:
    return f"{selection}-c{index}"


def start_selection(
    connection: redis.Redis,
    project_id: int,
    task_ids: Sequence[int],
    *,
    chunk_tasks: int,
    job_name: str,
    project_settings: dict | None,
    failure_callback: str | None = None,
) -> dict[str, Any]:
    """Plan the selection and enqueue its chunks that are not pending already; returns its status.

    `failure_callback`: RQ's on_failure callback of each chunk job, by dotted name (the worker's
    `prelabel_chunk_failed` counts a chunk that failed for good into the selection)."""
    ids = list(dict.fromkeys(task_ids))
    selection = selection_id(project_id, ids)
    chunks = [ids[start : start + chunk_tasks] for start in range(0, len(ids), chunk_tasks)]
    job_ids = [chunk_job_id(selection, index) for index in range(len(chunks))]
    existing = Job.fetch_many(job_ids, connection=connection, serializer=SERIALIZER)
    fresh = [
        index
        for index, job in enumerate(existing)
        if job is None or job.get_status(refresh=False) not in PENDING
    ]
    key = PREFIX + selection
    queue = get_queue(PRELABEL, connection)
    policy = spec(PRELABEL)
    with connection.pipeline() as pipe:
        # Nothing of it runs: a new selection, or one asked again after it ended.
        if len(fresh) == len(chunks):
            pipe.delete(key, f"{key}:failures", f"{key}:ended")
            pipe.hset(
                key,
                mapping={
                    "project": project_id,
                    "total": len(ids),
                    "chunks": len(chunks),
                    "created_at": time.time(),
                    "cancelled": 0,
                    "done": 0,
                    "failed": 0,
                },
            )
        for index in fresh:
            pipe.srem(f"{key}:ended", index)
        queue.enqueue_many(
            [
                queue.prepare_data(
                    job_name,
                    kwargs={
                        "project_id": project_id,
                        "selection": selection,
                        "chunk": index,
                        "task_ids": chunks[index],
                        "project_settings": project_settings,
                    },
                    timeout=policy.job_timeout,
                    result_ttl=policy.result_ttl,
                    failure_ttl=policy.failure_ttl,
                    retry=policy.retry,
                    job_id=job_ids[index],
                    on_failure=Callback(failure_callback) if failure_callback else None,
                )
                for index in fresh
            ],
            pipeline=pipe,
        )
        for suffix in ("", ":failures", ":ended"):
            pipe.expire(key + suffix, KEPT_S)
        pipe.set(f"roi:project:{project_id}:selection", selection, ex=KEPT_S)
        pipe.execute()
    return selection_status(connection, selection)


def chunk_failed(connection: redis.Redis, job: Job, reason: str) -> bool:
    """A chunk job that failed for good: its tasks count as failed, with `reason`, so the selection ends."""
    kwargs = job.kwargs
    return chunk_ended(
        connection, kwargs["selection"], kwargs["chunk"], done=0, failures=[reason] * len(kwargs["task_ids"])
    )


def chunk_ended(
    connection: redis.Redis, selection: str, chunk: int, *, done: int, failures: Sequence[str]
) -> bool:
    """Count a chunk's outcome once (a retried chunk that ended before is not counted again)."""
    key = PREFIX + selection
    if not connection.sadd(f"{key}:ended", chunk):
        return False
    with connection.pipeline() as pipe:
        pipe.hincrby(key, "done", done)
        pipe.hincrby(key, "failed", len(failures))
        for reason in failures:
            pipe.hincrby(f"{key}:failures", reason[:300], 1)
        pipe.execute()
    return True


def claim_prediction(
    connection: redis.Redis, project_id: int, task_id: int, model_version: str, owner: str
) -> bool:
    """True when `owner` (a chunk's job id) may write the task's prediction of `model_version`: no other
    job has, so two selections that overlap (Retrieve predictions clicked twice) never write a task twice.
    A retry of the same chunk keeps its claim."""
    key = f"roi:prediction:{project_id}:{task_id}:{model_version}"
    if connection.set(key, owner, nx=True, ex=KEPT_S):
        return True
    return connection.get(key) == owner.encode()


def release_prediction(
    connection: redis.Redis, project_id: int, task_id: int, model_version: str, owner: str
) -> None:
    """Give up `owner`'s claim (its write failed for good), so a later selection may try the task again."""
    key = f"roi:prediction:{project_id}:{task_id}:{model_version}"
    with connection.pipeline() as pipe:
        pipe.watch(key)
        if pipe.get(key) == owner.encode():
            pipe.multi()
            pipe.delete(key)
            pipe.execute()


def is_cancelled(connection: redis.Redis, selection: str) -> bool:
    return connection.hget(PREFIX + selection, "cancelled") == b"1"


def cancel_selection(connection: redis.Redis, selection: str) -> dict[str, Any]:
    """Stop the selection: its queued chunks are cancelled and never run; a running chunk finishes."""
    key = PREFIX + selection
    if not connection.exists(key):
        raise KeyError(selection)
    connection.hset(key, "cancelled", 1)
    chunks = int(connection.hget(key, "chunks") or 0)
    jobs = Job.fetch_many(
        [chunk_job_id(selection, i) for i in range(chunks)], connection, serializer=SERIALIZER
    )
    for job in jobs:
        if job is not None and job.get_status(refresh=False) in (JobStatus.QUEUED, JobStatus.DEFERRED):
            job.cancel()
    return selection_status(connection, selection)


def latest_selection(connection: redis.Redis, project_id: int) -> str | None:
    value = connection.get(f"roi:project:{project_id}:selection")
    return value.decode() if value else None


def selection_status(connection: redis.Redis, selection: str) -> dict[str, Any]:
    """done / failed / total, failures by reason, and the state (running, finished, cancelled)."""
    key = PREFIX + selection
    with connection.pipeline(transaction=False) as pipe:
        pipe.hgetall(key)
        pipe.hgetall(f"{key}:failures")
        pipe.scard(f"{key}:ended")
        record, failures, ended = pipe.execute()
    if not record:
        raise KeyError(selection)
    fields = {k.decode(): v.decode() for k, v in record.items()}
    chunks = int(fields["chunks"])
    state = "cancelled" if fields["cancelled"] == "1" else "finished" if ended >= chunks else "running"
    return {
        "selection": selection,
        "project": int(fields["project"]),
        "state": state,
        "total": int(fields["total"]),
        "done": int(fields["done"]),
        "failed": int(fields["failed"]),
        "chunks": chunks,
        "chunks_ended": ended,
        "failures": {k.decode(): int(v) for k, v in failures.items()},
        "created_at": float(fields["created_at"]),
    }
