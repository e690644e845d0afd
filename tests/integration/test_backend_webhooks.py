"""/webhook against a real redis-server: counters, acceptance statistics, training triggers, and speed."""

from __future__ import annotations

import statistics
import time

import pytest
from rq.job import Job, JobStatus

from backend.project_state import project_stats
from backend.queues import SERIALIZER, TRAIN, get_queue
from backend.settings import Settings
from tests.integration.backend_harness import config, fake_calls, rectangle, running_backend

CAPTION = config("region_captioning.xml")
PROJECT = 4


@pytest.fixture
def backend(redis_server):
    with running_backend(Settings(redis_url=redis_server.url)) as running:
        yield running


def caption(region_id: str, text: str, origin: str) -> dict:
    return {
        "id": region_id,
        "from_name": "caption",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": [text]},
        "origin": origin,
    }


def annotation_event(action: str, annotation_id: int, result: list, *, was_cancelled: bool = False) -> dict:
    """Shaped like Label Studio's payload (reference/label-studio.md §2.5), trimmed to what matters here."""
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "result": result,
            "was_cancelled": was_cancelled,
            "task": 17,
            "project": PROJECT,
            "completed_by": 1,
        },
        "task": {"id": 17, "data": {"image": "/data/upload/4/a.png"}},
        "project": {"id": PROJECT, "title": "regions", "label_config": CAPTION},
    }


def start_training() -> dict:
    return {
        "action": "START_TRAINING",
        "project": {"id": PROJECT, "title": "regions", "label_config": CAPTION},
    }


def test_annotation_events_are_counted_and_submitted_ones_are_curated(backend, redis_conn):
    accepted = [rectangle("r1", 1, 1, 5, 5, origin="prediction"), caption("r1", "a cat", "prediction")]
    manual = [rectangle("r3", 20, 20, 5, 5, origin="manual")]

    created = backend.post("/webhook", annotation_event("ANNOTATION_CREATED", 42, accepted + manual))
    assert created.json() == {"status": "recorded", "curated": 1}
    backend.post("/webhook", annotation_event("ANNOTATION_UPDATED", 42, manual))
    deleted = backend.post(
        "/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 42}], "project": {"id": PROJECT}}
    )

    assert deleted.json() == {"status": "recorded"}
    assert project_stats(redis_conn, PROJECT) == {
        "annotations_created": 1,
        "annotations_updated": 1,
        "annotations_deleted": 1,
        "curated": 2,
    }


def test_every_n_curated_annotations_enqueue_fine_tuning(backend, redis_conn):
    backend.post(
        "/setup", {"project": f"{PROJECT}.1700000000", "schema": CAPTION, "extra_params": {"train_every": 2}}
    )
    box = [rectangle("r1", 1, 1, 5, 5, origin="manual")]

    first = backend.post("/webhook", annotation_event("ANNOTATION_CREATED", 1, box)).json()
    skipped = backend.post(
        "/webhook", annotation_event("ANNOTATION_CREATED", 2, [], was_cancelled=True)
    ).json()
    second = backend.post("/webhook", annotation_event("ANNOTATION_CREATED", 3, box)).json()

    assert "training" not in first and "training" not in skipped
    assert skipped["curated"] == 0  # a skipped task is not a curated annotation
    assert second["training"] == {
        "status": "queued",
        "job_id": f"finetune-{PROJECT}",
        "reason": "2 curated annotations (training every 2)",
    }
    job = Job.fetch(f"finetune-{PROJECT}", connection=redis_conn, serializer=SERIALIZER)
    assert job.origin == TRAIN
    assert job.kwargs == {"project_id": PROJECT, "reason": "2 curated annotations (training every 2)"}


def test_start_training_enqueues_one_job_per_project_at_a_time(
    backend, redis_conn, start_rq_worker, wait_until
):
    first = backend.post("/webhook", start_training())
    again = backend.post("/webhook", start_training())

    assert first.status_code == again.status_code == 200
    assert first.json()["training"]["status"] == "queued"
    assert again.json()["training"] == {
        "status": "already queued or running",
        "job_id": f"finetune-{PROJECT}",
    }
    assert get_queue(TRAIN, redis_conn).count == 1

    start_rq_worker([TRAIN])
    job = Job.fetch(f"finetune-{PROJECT}", connection=redis_conn, serializer=SERIALIZER)
    wait_until(lambda: job.get_status() == JobStatus.FINISHED, timeout_s=20, message="fine-tuning finished")
    assert fake_calls(redis_conn, "finetune") == [
        {"job": "finetune", "project_id": PROJECT, "reason": "START_TRAINING"}
    ]

    # A finished run does not block the next one (RQ keeps its hash for the result_ttl).
    after = backend.post("/webhook", start_training())
    assert after.json()["training"]["status"] == "queued"


def test_unknown_actions_are_ignored(backend):
    reply = backend.post(
        "/webhook", {"action": "TASKS_CREATED", "tasks": [{"id": 1}], "project": {"id": PROJECT}}
    )

    assert reply.status_code == 200
    assert reply.json() == {"status": "ignored", "action": "TASKS_CREATED"}


def test_webhooks_answer_well_under_50_ms(backend):
    """Label Studio sends webhooks inside the annotator's save and waits 1 s at most."""
    box = [rectangle("r1", 1, 1, 5, 5, origin="prediction"), caption("r1", "a cat", "prediction")]
    timings = []
    for annotation_id in range(1, 61):
        action = "ANNOTATION_CREATED" if annotation_id % 2 else "ANNOTATION_UPDATED"
        started = time.perf_counter()
        reply = backend.post("/webhook", annotation_event(action, annotation_id, box))
        timings.append(time.perf_counter() - started)
        assert reply.status_code == 200
    for _ in range(10):
        started = time.perf_counter()
        assert backend.post("/webhook", start_training()).status_code == 200
        timings.append(time.perf_counter() - started)

    timings.sort()
    p95 = timings[int(len(timings) * 0.95)]
    print(f"/webhook over HTTP: median {statistics.median(timings) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
    assert p95 < 0.050


def test_with_redis_down_webhooks_answer_503_at_once(backend, redis_server):
    redis_server.stop()

    started = time.monotonic()
    reply = backend.post("/webhook", start_training())

    assert time.monotonic() - started < 1.0
    assert reply.status_code == 503
    assert reply.json()["error"].startswith("Redis is unreachable")
