"""Redis in trouble, with real processes: a full Redis (maxmemory reached) pauses the workers and makes
the backend answer 503 with the reason; once memory is freed, service resumes by itself, no worker
restarted, nothing stored lost."""

from __future__ import annotations

import os

import pytest
import redis

from backend.queues import INTERACTIVE, enqueue, wait_for_result
from backend.settings import Settings
from tests.integration.backend_harness import config, predict_body, rectangle, running_backend
from tests.integration.worker_harness import describe_request

DESCRIBE = "worker.jobs.describe_regions"
JUNK = "test:junk:"


def fill_until_full(connection: redis.Redis) -> None:
    """Write junk keys until Redis refuses writes for lack of memory, and keep it full.

    Expiring keys (results, heartbeats) keep freeing a little memory, which would let small writes through
    now and then; so once full, maxmemory is set just under what is used: full until the junk is deleted.
    """
    value = os.urandom(64 * 1024)
    for number in range(100_000):
        try:
            connection.set(f"{JUNK}{number}", value)
        except redis.exceptions.OutOfMemoryError:
            break
    else:
        pytest.fail("Redis never filled up: maxmemory is not in force")
    connection.config_set("maxmemory", connection.info("memory")["used_memory"] - 256 * 1024)


def free(connection: redis.Redis) -> None:
    for key in connection.scan_iter(match=f"{JUNK}*", count=1000):
        connection.delete(key)


@pytest.fixture
def small_redis(redis_server, redis_conn):
    """The test Redis with maxmemory a few MB above what it uses now (noeviction, as in production)."""
    used = redis_conn.info("memory")["used_memory"]
    redis_conn.config_set("maxmemory", used + 4 * 1024 * 1024)
    yield redis_conn
    redis_conn.config_set("maxmemory", 0)


def test_a_full_redis_pauses_the_workers_and_service_resumes_when_memory_is_freed(
    small_redis, redis_server, start_worker, wait_until
):
    workers = start_worker.many("w1", "w2")
    assert wait_for_result(enqueue(small_redis, INTERACTIVE, DESCRIBE, describe_request()), timeout_s=60)
    stored = enqueue(small_redis, INTERACTIVE, "no.such.job", job_id="kept-through-the-outage")
    pids = {name: worker.pid for name, worker in workers.items()}

    fill_until_full(small_redis)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        enqueue(small_redis, INTERACTIVE, DESCRIBE, describe_request())
    for name, worker in workers.items():
        wait_until(lambda w=worker: "worker paused" in w.recorded(), 60, f"{name} notices the full Redis")
    with running_backend(Settings(redis_url=redis_server.url)) as backend:
        drawn = rectangle("r1", 10, 10, 30, 30, origin="manual")
        task = {"id": 1, "data": {"image": "/data/upload/1/a.png"}}
        body = predict_body(config("region_captioning.xml"), [task], context={"result": [drawn]})
        full = backend.post("/predict", body)
        webhook = backend.post(
            "/webhook",
            {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 5, "result": []}},
        )
    assert (full.status_code, webhook.status_code) == (503, 503)
    assert full.json()["error"].startswith("Redis is full (maxmemory reached)")
    assert webhook.json()["error"].startswith("Redis is full")

    free(small_redis)
    answered = wait_for_result(enqueue(small_redis, INTERACTIVE, DESCRIBE, describe_request()), timeout_s=120)

    assert answered["answers"][0]["id"] == "r1:caption"
    for name, worker in workers.items():
        assert worker.running and worker.pid == pids[name], f"{name} was restarted"
        wait_until(lambda w=worker: "worker resumed" in w.recorded(), 60, f"{name} resumes")
    assert small_redis.exists(f"rq:job:{stored.id}")  # what was stored before the outage is still there


def test_a_redis_that_goes_away_and_comes_back_is_ridden_out_by_the_same_worker(
    redis_server, redis_conn, start_worker, wait_until
):
    worker = start_worker("w1")
    pid = worker.pid
    redis_server.stop()
    wait_until(
        lambda: "worker paused" in worker.recorded() or "retrying" in worker.recorded(), 60, "outage seen"
    )
    redis_server.start()

    answered = wait_for_result(enqueue(redis_conn, INTERACTIVE, DESCRIBE, describe_request()), timeout_s=120)

    assert answered["answers"] and worker.running and worker.pid == pid
