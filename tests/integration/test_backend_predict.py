"""/predict against a real redis-server and a real RQ worker running the fake job functions."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend import heartbeats
from backend.queues import PRIORITY_ORDER
from backend.settings import Settings
from tests.integration.backend_harness import config, fake_calls, predict_body, rectangle, running_backend
from tests.integration.fake_worker_jobs import MODEL_VERSION

CAPTION = config("region_captioning.xml")
CLASSIFICATION = config("region_classification.xml")


@pytest.fixture
def make_backend(redis_server):
    started = []

    def make(**overrides):
        context = running_backend(Settings(redis_url=redis_server.url, **overrides))
        started.append(context)
        return context.__enter__()

    yield make
    for context in started:
        context.__exit__(None, None, None)


@pytest.fixture
def worker(redis_conn, start_rq_worker):
    process = start_rq_worker()
    heartbeats.beat(
        redis_conn, "fake-worker", {"model_version": MODEL_VERSION, "queues": list(PRIORITY_ORDER)}
    )
    return process


def task(task_id, image="/data/upload/3/img.png", **fields):
    return {"id": task_id, "data": {"image": image}, "annotations": [], "predictions": [], **fields}


def test_interactive_call_captions_the_newly_drawn_box_and_echoes_it(make_backend, worker, redis_conn):
    backend = make_backend()
    earlier = rectangle("pred1", 5, 5, 10, 10, origin="prediction")
    drawn = rectangle("new1", 20, 30, 40, 20, origin="manual")

    reply = backend.post("/predict", predict_body(CAPTION, [task(7)], context={"result": [earlier, drawn]}))

    assert reply.status_code == 200
    [prediction] = reply.json()["results"]
    box, caption, kept = prediction["result"]
    assert kept == {key: earlier[key] for key in kept}  # the earlier box goes back as it was
    assert (box["id"], box["type"], box["value"]["rectanglelabels"]) == (
        "new1",
        "rectanglelabels",
        ["Object"],
    )
    assert (caption["id"], caption["from_name"], caption["type"]) == ("new1", "caption", "textarea")
    assert caption["value"]["text"] == ["Describe <region1> briefly. | new1=[0.2, 0.3, 0.6, 0.5]"]
    assert prediction["model_version"] == MODEL_VERSION
    assert LabelInterface(CAPTION).validate_prediction(prediction, return_errors=True) == []
    [call] = fake_calls(redis_conn, "describe_regions")
    assert call["request"]["image"] == {"url": "/data/upload/3/img.png", "task_id": 7}
    assert [region["id"] for region in call["request"]["regions"]] == ["new1"]


def test_prompts_from_setup_reach_the_worker(make_backend, worker):
    backend = make_backend()
    setup = {
        "project": "3.1700000000",
        "schema": CAPTION,
        "hostname": "http://localhost:8080",
        "access_token": "secret",
        "extra_params": {"prompts": {"caption": "Name <region1> in three words."}},
    }
    assert backend.post("/setup", setup).json() == {"model_version": MODEL_VERSION}

    drawn = rectangle("r1", 10, 10, 20, 20, origin="manual")
    reply = backend.post("/predict", predict_body(CAPTION, [task(8)], context={"result": [drawn]}))

    caption = reply.json()["results"][0]["result"][1]
    assert caption["value"]["text"][0].startswith("Name <region1> in three words.")


def test_interactive_classification_answers_one_of_the_choices(make_backend, worker):
    backend = make_backend()
    drawn = rectangle("c1", 10, 10, 20, 20, origin="manual")

    reply = backend.post("/predict", predict_body(CLASSIFICATION, [task(9)], context={"result": [drawn]}))

    prediction = reply.json()["results"][0]
    assert [item["type"] for item in prediction["result"]] == ["rectanglelabels", "choices"]
    assert prediction["result"][1]["value"]["choices"] == ["Person"]
    assert LabelInterface(CLASSIFICATION).validate_prediction(prediction, return_errors=True) == []


def test_a_failing_job_keeps_the_box_and_says_why_in_its_caption(make_backend, worker):
    backend = make_backend()
    drawn = rectangle("r1", 10, 10, 20, 20, origin="manual")
    body = predict_body(
        CAPTION, [task(10, image="http://unreachable.invalid/a.png")], context={"result": [drawn]}
    )

    reply = backend.post("/predict", body)

    assert reply.status_code == 200
    [item] = reply.json()["results"]
    box, caption = item["result"]
    assert (box["id"], box["value"]["rectanglelabels"]) == ("r1", ["Object"])
    [text] = caption["value"]["text"]
    assert text.startswith("[no answer: the worker could not answer: ")
    assert "ConnectionError: cannot fetch http://unreachable.invalid/a.png" in text


def test_without_a_worker_the_interactive_call_times_out_keeping_the_box(make_backend):
    backend = make_backend(predict_timeout_s=0.3)
    drawn = rectangle("r1", 10, 10, 20, 20, origin="manual")

    started = time.monotonic()
    reply = backend.post("/predict", predict_body(CAPTION, [task(11)], context={"result": [drawn]}))

    assert time.monotonic() - started < 3
    [item] = reply.json()["results"]
    assert item["result"][0]["id"] == "r1"
    assert item["result"][1]["value"]["text"][0].startswith("[no answer: no answer within 0.3 s")


def test_batch_answers_every_task_in_order(make_backend, worker, caplog):
    backend = make_backend()
    annotated = task(
        1,
        annotations=[
            {
                "id": 11,
                "result": [rectangle("a1", 10, 10, 20, 20), rectangle("a2", 50, 50, 10, 10)],
                "updated_at": "2",
            }
        ],
    )
    predicted = task(
        2, predictions=[{"id": 21, "result": [rectangle("p1", 30, 30, 10, 10)], "created_at": "1"}]
    )
    no_regions = task(3)
    no_image = {"id": 4, "data": {}, "annotations": [{"id": 41, "result": [rectangle("x1", 1, 1, 5, 5)]}]}

    reply = backend.post("/predict", predict_body(CAPTION, [annotated, predicted, no_regions, no_image]))

    assert reply.status_code == 200
    first, second, third, fourth = reply.json()["results"]
    assert [item["id"] for item in first["result"]] == ["a1", "a1", "a2", "a2"]
    assert [item["id"] for item in second["result"]] == ["p1", "p1"]
    assert first["model_version"] == second["model_version"] == MODEL_VERSION
    assert third == fourth == []  # Label Studio stores nothing and asks again next time
    assert "task 4 has no image URL under 'image'" in caplog.text


def test_identical_concurrent_calls_share_one_job(make_backend, worker, redis_conn, tmp_path, wait_until):
    backend = make_backend()
    go = tmp_path / "go"
    body = predict_body(
        CAPTION,
        [task(5, image=f"/data/upload/3/img.png?hold={go}")],
        context={"result": [rectangle("r1", 1, 1, 9, 9, origin="manual")]},
    )

    # Auto-predict on task open fires two identical calls (reference/label-studio.md §2.3).
    with ThreadPoolExecutor(2) as pool:
        replies = [pool.submit(backend.post, "/predict", body) for _ in range(2)]
        wait_until(lambda: fake_calls(redis_conn, "describe_regions"), message="the job started")
        # The worker runs the held job, so the blocked clients are the two calls waiting for its result.
        wait_until(lambda: redis_conn.info("clients")["blocked_clients"] >= 2, message="both calls wait")
        go.touch()
        first, second = (reply.result().json() for reply in replies)

    assert first == second
    assert first["results"][0]["result"][1]["value"]["text"][0].startswith("Describe <region1>")
    assert len(fake_calls(redis_conn, "describe_regions")) == 1


def test_a_large_selection_answers_what_is_ready_and_hands_the_rest_to_prelabel(
    make_backend, worker, redis_conn, wait_until
):
    backend = make_backend(inline_predict_tasks=1)
    extra = {"prompts": {"caption": "What is <region1>?"}, "train_every": 5}
    backend.post("/setup", {"project": "3.1700000000", "schema": CAPTION, "extra_params": extra})
    tasks = [
        task(task_id, predictions=[{"id": task_id, "result": [rectangle(f"b{task_id}", 5, 5, 20, 20)]}])
        for task_id in (31, 32, 33)
    ]
    tasks.append(task(34))  # no regions
    # Task 31 was described before (e.g. when it was opened): its answer is ready.
    assert "result" in backend.post("/predict", predict_body(CAPTION, tasks[:1])).json()["results"][0]

    reply = backend.post("/predict", predict_body(CAPTION, tasks))

    ready, queued_32, queued_33, empty = reply.json()["results"]
    assert [item["id"] for item in ready["result"]] == ["b31", "b31"]
    assert queued_32 == queued_33 == empty == []  # the prelabel job writes 32 and 33 itself
    calls = wait_until(lambda: fake_calls(redis_conn, "prelabel_chunk"), message="prelabel chunk ran")
    assert calls == [
        {"job": "prelabel_chunk", "project_id": 3, "task_ids": [32, 33], "project_settings": extra}
    ]
    progress = backend.get("/prelabel/3").json()
    assert (progress["total"], progress["chunks"]) == (2, 1)


def test_with_redis_down_predict_answers_503_at_once(make_backend, redis_server):
    backend = make_backend()
    redis_server.stop()
    drawn = rectangle("r1", 10, 10, 20, 20, origin="manual")

    started = time.monotonic()
    reply = backend.post("/predict", predict_body(CAPTION, [task(12)], context={"result": [drawn]}))

    assert time.monotonic() - started < 1.0
    assert reply.status_code == 503
    assert reply.json()["error"].startswith("Redis is unreachable")


def test_interactive_overhead_of_enqueue_and_wait_is_small(make_backend, worker):
    """Round trip of an interactive /predict with an instant job: HTTP, Redis, RQ pickup and result."""
    backend = make_backend()
    warm_up = predict_body(
        CAPTION, [task(13)], context={"result": [rectangle("w", 1, 1, 5, 5, origin="manual")]}
    )
    assert backend.post("/predict", warm_up).json()["results"][0]["result"]  # the worker is up and listening
    timings = []
    for index in range(20):
        drawn = rectangle(f"o{index}", index, 10, 20, 20, origin="manual")  # a new box each time: no reuse
        started = time.perf_counter()
        reply = backend.post("/predict", predict_body(CAPTION, [task(13)], context={"result": [drawn]}))
        timings.append(time.perf_counter() - started)
        assert reply.json()["results"][0]["result"], reply.text

    median = statistics.median(timings)
    print(
        f"interactive /predict with an instant job: median {median * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms"
    )
    assert median < 1.0
