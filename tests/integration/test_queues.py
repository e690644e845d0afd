"""backend.queues against a real redis-server and a real RQ SimpleWorker process."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from rq.exceptions import DuplicateJobError
from rq.job import JobStatus
from rq.results import Result

from backend.queues import (
    INTERACTIVE,
    MAX_BLOCK_S,
    PRELABEL,
    PRIORITY_ORDER,
    QUEUES,
    JobFailed,
    JobTimeout,
    enqueue,
    get_queue,
    wait_for_result,
)

JOBS = "tests.integration.jobs_for_tests"


def test_enqueue_by_name_round_trip(redis_conn, start_rq_worker):
    start_rq_worker()
    job = enqueue(
        redis_conn,
        INTERACTIVE,
        f"{JOBS}.echo",
        "a red circle",
        job_id="describe-17-r1",
        meta={"task": 17},
        n=3,
    )

    assert wait_for_result(job, timeout_s=20) == {"echo": "a red circle", "extra": {"n": 3}}
    job.refresh()
    assert job.id == "describe-17-r1"
    assert job.origin == INTERACTIVE
    assert job.timeout == QUEUES[INTERACTIVE].job_timeout
    assert job.meta == {"task": 17}


def test_keyword_arguments_reach_the_job_even_when_rq_uses_the_same_names(redis_conn, start_rq_worker):
    start_rq_worker()
    job = enqueue(redis_conn, INTERACTIVE, f"{JOBS}.echo", 1, description="mine", job_timeout=5, ttl=7)

    assert wait_for_result(job, timeout_s=20)["extra"] == {"description": "mine", "job_timeout": 5, "ttl": 7}


def test_a_failing_job_raises_job_failed_with_the_exception_line(redis_conn, start_rq_worker):
    start_rq_worker()
    job = enqueue(redis_conn, INTERACTIVE, f"{JOBS}.fail", "region r2 lies outside the image")

    with pytest.raises(JobFailed) as failure:
        wait_for_result(job, timeout_s=20)

    assert failure.value.reason == "ValueError: region r2 lies outside the image"
    assert failure.value.job_id == job.id
    assert "Traceback" in failure.value.exc_string
    assert "Traceback" not in str(failure.value)


def test_no_result_before_the_deadline_raises_job_timeout(redis_conn):
    job = enqueue(redis_conn, INTERACTIVE, f"{JOBS}.echo", "nobody listens")  # no worker running

    started = time.monotonic()
    with pytest.raises(JobTimeout) as timeout:
        wait_for_result(job, timeout_s=0.3)

    assert 0.3 <= time.monotonic() - started < 0.3 + MAX_BLOCK_S
    assert timeout.value.job_id == job.id


def test_a_retried_job_delivers_its_final_result_not_the_retried_one(
    redis_conn, start_rq_worker, tmp_path, wait_until
):
    go_file = tmp_path / "go"
    start_rq_worker()
    job = enqueue(
        redis_conn, INTERACTIVE, f"{JOBS}.retry_then_wait", str(tmp_path / "first-attempt"), str(go_file)
    )
    wait_until(
        lambda: [result for result in job.results() if result.type == Result.Type.RETRIED],
        message="the job's first attempt asked for a retry",
    )

    # A RETRIED result exists and the second attempt is still waiting: that is no answer yet.
    with pytest.raises(JobTimeout):
        wait_for_result(job, timeout_s=0.3)
    go_file.touch()

    assert wait_for_result(job, timeout_s=20) == "final answer"
    assert [result.type for result in reversed(job.results())] == [
        Result.Type.RETRIED,
        Result.Type.SUCCESSFUL,
    ]


def test_a_job_out_of_retries_raises_job_failed(redis_conn, start_rq_worker):
    start_rq_worker()
    job = enqueue(redis_conn, INTERACTIVE, f"{JOBS}.always_retry")

    with pytest.raises(JobFailed, match="gave up after its retries"):
        wait_for_result(job, timeout_s=20)


def test_the_prelabel_queue_retries_a_job_that_raised(redis_conn, start_rq_worker, tmp_path):
    assert QUEUES[PRELABEL].retry is not None
    start_rq_worker()
    job = enqueue(redis_conn, PRELABEL, f"{JOBS}.fail_once", str(tmp_path / "first-attempt"))

    assert wait_for_result(job, timeout_s=20) == "recovered"
    assert (tmp_path / "first-attempt").exists()


def test_a_unique_job_id_refuses_a_second_job(redis_conn):
    enqueue(redis_conn, PRELABEL, f"{JOBS}.echo", 1, job_id="prelabel-project-3", unique=True)

    with pytest.raises(DuplicateJobError):
        enqueue(redis_conn, PRELABEL, f"{JOBS}.echo", 2, job_id="prelabel-project-3", unique=True)
    assert get_queue(PRELABEL, redis_conn).count == 1


def test_a_worker_serves_the_interactive_queue_first(redis_conn, start_rq_worker):
    bulk = enqueue(redis_conn, PRELABEL, f"{JOBS}.echo", "bulk")
    person = enqueue(redis_conn, INTERACTIVE, f"{JOBS}.echo", "person")
    start_rq_worker(PRIORITY_ORDER, "--burst")

    wait_for_result(bulk, timeout_s=20)
    person.refresh()
    bulk.refresh()
    assert person.ended_at <= bulk.started_at


def test_bad_names_are_refused_before_anything_is_enqueued(redis_conn):
    with pytest.raises(ValueError, match="dotted name"):
        enqueue(redis_conn, INTERACTIVE, "describe_regions")
    with pytest.raises(ValueError, match="unknown queue 'gpu'"):
        enqueue(redis_conn, "gpu", f"{JOBS}.echo")
    assert all(get_queue(name, redis_conn).count == 0 for name in PRIORITY_ORDER)


def test_the_client_socket_timeout_outlasts_a_blocking_wait(redis_conn):
    assert redis_conn.connection_pool.connection_kwargs["socket_timeout"] > MAX_BLOCK_S


def test_waiting_survives_a_redis_restart(redis_server, redis_conn, start_rq_worker, tmp_path, wait_until):
    go_file = tmp_path / "go"
    start_rq_worker()
    job = enqueue(redis_conn, INTERACTIVE, f"{JOBS}.wait_for_file", str(go_file))
    wait_until(lambda: job.get_status() == JobStatus.STARTED, message="the job started")

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(wait_for_result, job, 30)
        redis_server.stop()
        redis_server.start()
        go_file.touch()

        assert waiting.result(timeout=40) == "go"
