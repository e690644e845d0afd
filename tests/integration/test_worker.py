"""The region worker (`python -m worker.main`) as real processes on a real redis-server, with a tiny model.

Executions are counted from the workers' JSON logs (one "job started" line per execution); tests wait on
conditions (a heartbeat, a held HTTP request, a log line), never on sleeps.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry

from backend.heartbeats import live_workers
from backend.queues import INTERACTIVE, PRELABEL, QUEUES, JobFailed, enqueue, get_queue, wait_for_result
from backend.registry_snapshot import read as registry_snapshot
from backend.settings import Settings
from tests.integration.conftest import REPO_ROOT
from tests.integration.worker_harness import (
    BOX,
    IMAGE,
    describe_request,
    executions,
    maintenance_passes,
    png_bomb,
    save_tiny_model,
    started_jobs,
)

DESCRIBE = "worker.jobs.describe_regions"


def engine_answers(model_dir: Path, files_root: Path, request: dict) -> list[dict]:
    """The same request answered in this process by the engine directly."""
    from backend.images import load_image
    from roi_contract.describe import DescribeRequest
    from roi_model.engine import RegionEngine
    from worker.jobs import describe_result, engine_request

    parsed = DescribeRequest.model_validate(request)
    image = load_image(parsed.image.url, task_id=None, settings=Settings(local_files_root=files_root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run (OMP_NUM_THREADS=1)
    try:
        [answers] = RegionEngine.from_pretrained(model_dir).answer([engine_request(parsed, image)])
    finally:
        torch.set_num_threads(threads)
    return describe_result(parsed, answers, "unused").model_dump(mode="json")["answers"]


def heartbeat(connection, name: str) -> dict | None:
    return next((w for w in live_workers(connection) if w["name"] == name), None)


def healthcheck(*flags: str, redis_url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.main", "--healthcheck", *flags],
        cwd=REPO_ROOT,
        env={"REDIS_URL": redis_url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_describe_job_round_trips_and_matches_the_engine(
    redis_conn, redis_server, start_worker, model_registry, worker_files
):
    worker = start_worker("w1")
    request = describe_request()

    result = wait_for_result(enqueue(redis_conn, INTERACTIVE, DESCRIBE, request), timeout_s=60)

    expected = engine_answers(model_registry.path("v1"), worker_files, request)
    assert result["model_version"] == "v1"
    assert [a["id"] for a in result["answers"]] == ["r1:caption"]
    assert [a["text"] for a in result["answers"]] == [a["text"] for a in expected]
    assert [a["score"] for a in result["answers"]] == pytest.approx([a["score"] for a in expected], abs=1e-5)

    beat = heartbeat(redis_conn, "w1")
    assert beat["model_version"] == "v1"
    assert beat["queues"] == [INTERACTIVE, PRELABEL]
    assert (beat["pid"], beat["device"], beat["state"]) == (worker.pid, "cpu", "idle")
    snapshot = registry_snapshot(redis_conn)
    assert snapshot["current"] == "v1"
    assert [card["version"] for card in snapshot["versions"]] == ["v1"]

    assert healthcheck("--name", "w1", redis_url=redis_server.url).returncode == 0
    assert healthcheck(redis_url=redis_server.url).returncode == 0  # a worker on this host
    unknown = healthcheck("--name", "nobody", redis_url=redis_server.url)
    assert unknown.returncode == 1
    assert "no fresh heartbeat from worker 'nobody'" in unknown.stdout

    twin = subprocess.run(
        [sys.executable, "-m", "worker.main", "--name", "w1"],
        cwd=REPO_ROOT,
        env={**start_worker.env, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert twin.returncode == 1
    assert "a live worker named 'w1' is already running" in twin.stderr
    assert worker.running


def test_a_job_whose_worker_is_killed_is_run_again_by_another_worker(
    redis_conn, start_worker, image_server, worker_files, wait_until
):
    # Beats every 0.25 s: a job's lease is 3 s, the time a dead worker's job waits to be re-queued.
    workers = start_worker.many("w1", "w2", flags=["--heartbeat-interval", "0.25"])
    url = image_server.add("slow.png", (worker_files / IMAGE).read_bytes())
    image_server.hold("slow.png")
    job = enqueue(redis_conn, PRELABEL, DESCRIBE, describe_request(url))
    wait_until(
        lambda: image_server.waiting["slow.png"] == 1, timeout_s=30, message="a worker fetching the image"
    )
    job.refresh()
    holder, other = job.worker_name, ({"w1", "w2"} - {job.worker_name}).pop()

    # While its worker lives, the job is not taken away, however long it runs: the other worker's
    # maintenance passes over it well after the 3 s lease the job started with.
    held_since = time.time()
    wait_until(
        lambda: maintenance_passes(workers[other].recorded(), PRELABEL, after=held_since + 6) >= 2,
        timeout_s=60,
        message="maintenance passes of the other worker",
    )
    assert job.get_status(refresh=True) == JobStatus.STARTED
    assert job.id in StartedJobRegistry(PRELABEL, connection=redis_conn).get_job_ids()
    assert executions([workers[other].recorded()], job.id) == 0

    workers[holder].kill()
    image_server.release("slow.png")
    result = wait_for_result(job, timeout_s=60)

    assert result["model_version"] == "v1" and result["answers"][0]["id"] == "r1:caption"
    job.refresh()
    assert job.worker_name == other
    assert executions([workers[holder].recorded()], job.id) == 1
    assert executions([workers[other].recorded()], job.id) == 1
    assert job.retries_left == QUEUES[PRELABEL].retry.max - 1
    assert StartedJobRegistry(PRELABEL, connection=redis_conn).count == 0
    assert FailedJobRegistry(PRELABEL, connection=redis_conn).count == 0


def test_the_worker_reconnects_after_redis_restarts(redis_conn, redis_server, start_worker, wait_until):
    worker = start_worker("w1")
    assert wait_for_result(enqueue(redis_conn, INTERACTIVE, DESCRIBE, describe_request()), timeout_s=60)

    redis_server.stop()  # every connection of the worker breaks
    redis_server.start()  # same port, same data (AOF)
    job = enqueue(redis_conn, INTERACTIVE, DESCRIBE, describe_request())

    assert wait_for_result(job, timeout_s=60)["model_version"] == "v1"
    job.refresh()
    assert job.worker_name == "w1" and worker.running
    wait_until(lambda: heartbeat(redis_conn, "w1"), timeout_s=30, message="the heartbeat back")


def test_a_job_enqueued_without_a_timeout_runs_under_its_queues_timeout(redis_conn, start_worker):
    # Raw RQ jobs, as another client may enqueue them: one with RQ's "no timeout" (-1), one whose hash has no
    # timeout at all. Both wait in their queues until the worker starts, so it is the worker that decides.
    jobs = {}
    for queue_name, timeout in [(INTERACTIVE, -1), (PRELABEL, -1), (INTERACTIVE, None), (PRELABEL, None)]:
        queue = get_queue(queue_name, redis_conn)
        job = queue.enqueue("tests.integration.jobs_for_tests.own_timeout", job_timeout=-1)
        if timeout is None:  # the hash without the field
            redis_conn.hdel(job.key, "timeout")
            assert Job.fetch(job.id, connection=redis_conn, serializer=queue.serializer).timeout is None
        jobs[(queue_name, timeout)] = job
    start_worker("w1")

    timeouts = {key: wait_for_result(job, timeout_s=60) for key, job in jobs.items()}

    assert timeouts == {
        (INTERACTIVE, -1): QUEUES[INTERACTIVE].job_timeout,
        (PRELABEL, -1): QUEUES[PRELABEL].job_timeout,
        (INTERACTIVE, None): QUEUES[INTERACTIVE].job_timeout,
        (PRELABEL, None): QUEUES[PRELABEL].job_timeout,
    }
    # The two queues' timeouts and RQ's own default (180 s) differ, so each outcome is told apart.
    assert len({QUEUES[INTERACTIVE].job_timeout, QUEUES[PRELABEL].job_timeout, 180}) == 3
    # A job that sets its own timeout keeps it.
    own = get_queue(INTERACTIVE, redis_conn).enqueue(
        "tests.integration.jobs_for_tests.own_timeout", job_timeout=7
    )
    assert wait_for_result(own, timeout_s=60) == 7


POISONS = [
    ("not an image", {"url": "junk.png"}, "not an image in a supported format"),
    ("zero-area box", {"box": [0.4, 0.2, 0.4, 0.7]}, "has zero area"),
    ("host not allowed", {"url": "http://images.example.com/a.png"}, "is not in ROI_IMAGE_ALLOWED_HOSTS"),
    ("path with ..", {"url": "../secret.png"}, "leads outside ROI_LOCAL_FILES_ROOT"),
    ("PNG bomb", {"url": "bomb.png"}, "decompression bomb"),
]


def test_poison_jobs_fail_at_once_with_their_reason_and_the_worker_goes_on(
    redis_conn, start_worker, worker_files
):
    (worker_files / "junk.png").write_bytes(b"<html>login required</html>")
    (worker_files.parent / "secret.png").write_bytes(
        (worker_files / IMAGE).read_bytes()
    )  # exists, but outside
    (worker_files / "bomb.png").write_bytes(png_bomb(20000))
    worker = start_worker("w1")

    for label, change, reason in POISONS:
        request = describe_request(change.get("url", IMAGE), change.get("box", BOX))
        poison = enqueue(redis_conn, PRELABEL, DESCRIBE, request)  # the prelabel queue retries: not these
        with pytest.raises(JobFailed) as failure:
            wait_for_result(poison, timeout_s=60)
        assert reason in failure.value.reason, label

        good = enqueue(redis_conn, INTERACTIVE, DESCRIBE, describe_request())
        assert wait_for_result(good, timeout_s=60)["model_version"] == "v1", label
        good.refresh()
        assert good.worker_name == "w1", label
        assert executions([worker.recorded()], poison.id) == 1, f"{label}: retried"
    assert worker.running
    assert FailedJobRegistry(PRELABEL, connection=redis_conn).count == len(POISONS)


def test_a_transient_failure_is_retried_on_a_queue_with_retry_only(
    redis_conn, start_worker, image_server, worker_files
):
    worker = start_worker("w1")
    url = image_server.add("flaky.png", (worker_files / IMAGE).read_bytes())

    image_server.fail("flaky.png", 503, times=1)
    bulk = enqueue(redis_conn, PRELABEL, DESCRIBE, describe_request(url))
    assert wait_for_result(bulk, timeout_s=60)["model_version"] == "v1"
    assert executions([worker.recorded()], bulk.id) == 2
    assert image_server.requests["flaky.png"] == 2

    # another image: the worker keeps recently fetched images, so "flaky.png" would not be fetched again
    other = image_server.add("flaky-interactive.png", (worker_files / IMAGE).read_bytes())
    image_server.fail("flaky-interactive.png", 503, times=1)
    interactive = enqueue(redis_conn, INTERACTIVE, DESCRIBE, describe_request(other))
    with pytest.raises(JobFailed, match="HTTP 503"):
        wait_for_result(interactive, timeout_s=60)
    assert executions([worker.recorded()], interactive.id) == 1


def test_200_jobs_from_8_clients_on_2_workers_are_each_answered_once(redis_conn, redis_server, start_worker):
    workers = start_worker.many("w1", "w2").values()
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def client(number: int) -> None:
        from backend.queues import connect

        connection = connect(Settings(redis_url=redis_server.url))
        try:
            for index in range(25):
                question = f"c{number}-q{index}"
                box = [0.05 + 0.01 * index, 0.1, 0.6, 0.2 + 0.02 * number]
                job = enqueue(
                    connection, INTERACTIVE, DESCRIBE, describe_request(box=box, question_id=question)
                )
                results[job.id] = (question, wait_for_result(job, timeout_s=120))
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert errors == []
    assert len(results) == 200
    assert all(result["answers"][0]["id"] == question for question, result in results.values())
    counts = started_jobs(worker.recorded() for worker in workers)
    assert {job_id: counts[job_id] for job_id in results} == dict.fromkeys(results, 1)
    served = {Job.fetch(job_id, connection=redis_conn).worker_name for job_id in results}
    assert served == {"w1", "w2"}
    assert StartedJobRegistry(INTERACTIVE, connection=redis_conn).count == 0
    assert FailedJobRegistry(INTERACTIVE, connection=redis_conn).count == 0
    assert get_queue(INTERACTIVE, redis_conn).count == 0


def test_a_promoted_model_serves_the_next_job_without_a_restart(
    redis_conn, start_worker, model_registry, worker_files, tmp_path, wait_until
):
    worker = start_worker("w1")
    request = describe_request()
    first = wait_for_result(enqueue(redis_conn, INTERACTIVE, DESCRIBE, request), timeout_s=60)

    model_registry.publish(save_tiny_model(tmp_path / "retrained", seed=1), version="v2", parent="v1")
    model_registry.promote("v2")
    second = wait_for_result(enqueue(redis_conn, INTERACTIVE, DESCRIBE, request), timeout_s=60)

    assert (first["model_version"], second["model_version"]) == ("v1", "v2")
    expected = engine_answers(model_registry.path("v2"), worker_files, request)
    assert first["answers"][0]["score"] != pytest.approx(expected[0]["score"], abs=1e-5)  # v2 really differs
    assert second["answers"][0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)
    assert second["answers"][0]["text"] == expected[0]["text"]
    assert registry_snapshot(redis_conn)["current"] == "v2"
    wait_until(lambda: (heartbeat(redis_conn, "w1") or {}).get("model_version") == "v2", message="v2 beat")

    # A promoted version that cannot load leaves the served one in place.
    broken = model_registry.publish(save_tiny_model(tmp_path / "broken"), version="v3")
    (model_registry.path(broken) / "model.safetensors").write_bytes(b"truncated")
    model_registry.promote("v3")
    third = wait_for_result(enqueue(redis_conn, INTERACTIVE, DESCRIBE, request), timeout_s=60)
    assert third["model_version"] == "v2"
    assert "model version v3 cannot be loaded" in worker.recorded()
    assert worker.running


def test_sigterm_finishes_the_job_in_hand_then_exits(
    redis_conn, redis_server, start_worker, image_server, worker_files, wait_until
):
    worker = start_worker("w1")
    url = image_server.add("slow.png", (worker_files / IMAGE).read_bytes())
    image_server.hold("slow.png")
    job = enqueue(redis_conn, INTERACTIVE, DESCRIBE, describe_request(url))
    wait_until(lambda: image_server.waiting["slow.png"] == 1, timeout_s=30, message="the job in progress")

    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: (heartbeat(redis_conn, "w1") or {}).get("state") == "stopping", message="stopping")
    image_server.release("slow.png")

    assert wait_for_result(job, timeout_s=60)["model_version"] == "v1"
    assert worker.wait(30) == 0
    assert heartbeat(redis_conn, "w1") is None
    assert healthcheck("--name", "w1", redis_url=redis_server.url).returncode == 1


def test_the_worker_refuses_to_start_without_a_current_version(tmp_path, redis_server):
    started = subprocess.run(
        [sys.executable, "-m", "worker.main", "--model-dir", str(tmp_path / "empty")],
        cwd=REPO_ROOT,
        env={"REDIS_URL": redis_server.url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2
    assert started.stderr.strip().count("\n") == 0
    assert "no model version is being served" in started.stderr
    assert "current does not exist" in started.stderr


def test_urls_that_would_leak_the_label_studio_key_are_refused_before_any_request(
    redis_conn, start_worker, image_server
):
    from tests.integration.worker_harness import ImageServer

    with ImageServer() as canary:
        start_worker(
            "w1", env={"LABEL_STUDIO_URL": f"http://{image_server.host}", "LABEL_STUDIO_API_KEY": "s3cret"}
        )
        attacks = {
            f"http://{canary.host}\\@{image_server.host}/data/upload/1/ok.png": "backslash",
            f"http://x@{canary.host}/data/upload/1/ok.png": "user info",
            "/data/upload/../../api/projects/": "not a Label Studio media path",
            f"http://{canary.host}/ok.png": "not in ROI_IMAGE_ALLOWED_HOSTS",
        }
        for url, reason in attacks.items():
            job = enqueue(redis_conn, INTERACTIVE, DESCRIBE, describe_request(url))
            with pytest.raises(JobFailed, match=reason):
                wait_for_result(job, timeout_s=60)

        assert sum(canary.requests.values()) == 0
    assert sum(image_server.requests.values()) == 0
