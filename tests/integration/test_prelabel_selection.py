"""A large "Retrieve predictions" through the backend: chunks spread over real workers, progress readable,
a worker killed mid-chunk, a cancelled selection; a real Label Studio holds the tasks.

The tasks carry boxes an annotator drew; their images come from an image server on loopback, where one
image can be held back to keep a chunk in progress while its worker is killed.
"""

from __future__ import annotations

import pytest
import requests
from PIL import Image
from rq.job import Job

from backend.app import JobNames
from backend.ls_client import LabelStudioClient
from backend.queues import PRELABEL, SERIALIZER, get_queue
from backend.selections import chunk_job_id, claim_prediction, latest_selection, release_prediction
from backend.settings import Settings
from devstack.label_studio import LabelStudio
from tests.integration.backend_harness import config, predict_body, rectangle, running_backend

CAPTION = config("region_captioning.xml")
TASKS, CHUNK = 30, 8


def boxed_project(client: LabelStudioClient, image_server, title: str, count: int, held: int | None = None):
    """A project of `count` tasks, each with two drawn boxes; task `held` shows the held image."""
    image_server.add("scene.png", Image.new("RGB", (64, 48), (200, 40, 40)))
    image_server.add("held.png", Image.new("RGB", (64, 48), (40, 40, 200)))
    project = client.create_project(title, CAPTION)
    tasks = [
        {"data": {"image": image_server.url("held.png" if index == held else "scene.png")}}
        for index in range(count)
    ]
    task_ids = client.import_tasks(project, tasks)
    for task_id in task_ids:
        client.create_annotation(task_id, [rectangle("b1", 10, 10, 30, 40), rectangle("b2", 50, 20, 40, 60)])
    return project, task_ids


@pytest.fixture
def ls(label_studio: LabelStudio) -> LabelStudioClient:
    return LabelStudioClient(label_studio.url, label_studio.token)


@pytest.fixture
def backend(redis_server, label_studio):
    settings = Settings(
        redis_url=redis_server.url,
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        inline_predict_tasks=2,
        prelabel_chunk_tasks=CHUNK,
    )
    with running_backend(settings, JobNames()) as running:
        yield running


def retrieve(backend, ls: LabelStudioClient, project: int, task_ids: list[int]) -> list:
    """What Label Studio sends for "Retrieve predictions": the selected tasks with their annotations."""
    tasks = ls.get_tasks(project, task_ids)
    reply = backend.post("/predict", predict_body(CAPTION, tasks, project=f"{project}.1700000000"))
    assert reply.status_code == 200, reply.text
    return reply.json()["results"]


def progress(backend, project: int) -> dict:
    return requests.get(f"{backend.url}/prelabel/{project}", timeout=10).json()


def test_a_large_selection_is_chunked_over_the_workers_and_reports_its_progress(
    backend, ls, label_studio, image_server, start_worker, wait_until
):
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    start_worker.many("w1", "w2", env=env)
    project, task_ids = boxed_project(ls, image_server, "selection", TASKS)

    results = retrieve(backend, ls, project, task_ids)

    assert results == [[] for _ in task_ids]  # the chunks write the predictions themselves
    status = wait_until(
        lambda: (s := progress(backend, project))["state"] == "finished" and s, 300, "selection"
    )
    assert (status["total"], status["done"], status["failed"]) == (TASKS, TASKS, 0)
    assert status["chunks"] == -(-TASKS // CHUNK)
    tasks = ls.get_tasks(project, task_ids)
    assert all(len(task["predictions"]) == 1 for task in tasks)
    assert len({task["predictions"][0]["model_version"] for task in tasks}) == 1


def test_a_worker_killed_mid_chunk_leaves_every_task_with_exactly_one_prediction(
    backend, ls, label_studio, image_server, start_worker, redis_conn, wait_until
):
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    workers = start_worker.many("w1", "w2", env=env)
    project, task_ids = boxed_project(ls, image_server, "selection with a crash", TASKS, held=CHUNK + 3)
    image_server.hold("held.png")  # the second chunk stays in progress while its worker is killed

    retrieve(backend, ls, project, task_ids)
    wait_until(lambda: image_server.waiting["held.png"] >= 1, 120, "the held image requested")
    chunk = Job.fetch(
        chunk_job_id(latest_selection(redis_conn, project), 1), redis_conn, serializer=SERIALIZER
    )
    workers[chunk.worker_name].kill()
    image_server.release("held.png")

    status = wait_until(
        lambda: (s := progress(backend, project))["state"] == "finished" and s, 300, "selection"
    )
    assert (status["done"], status["failed"]) == (TASKS, 0)
    tasks = ls.get_tasks(project, task_ids)
    assert [len(task["predictions"]) for task in tasks] == [1] * TASKS


def test_a_cancelled_selection_writes_nothing_more(
    backend, ls, label_studio, image_server, start_worker, redis_conn
):
    project, task_ids = boxed_project(ls, image_server, "selection cancelled", TASKS)
    retrieve(backend, ls, project, task_ids)  # no worker yet: every chunk waits in the queue

    cancelled = requests.delete(f"{backend.url}/prelabel/{project}", timeout=10).json()
    start_worker("w1", env={"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token})

    assert cancelled["state"] == "cancelled"
    assert get_queue(PRELABEL, redis_conn).count == 0  # the worker, ready, finds no chunk to run
    assert progress(backend, project)["done"] == 0
    assert all(task["predictions"] == [] for task in ls.get_tasks(project, task_ids))


def test_a_chunk_that_fails_for_good_counts_its_tasks_as_failed_with_the_reason(
    backend, ls, image_server, start_worker, wait_until
):
    project, task_ids = boxed_project(ls, image_server, "selection failing", TASKS)
    start_worker("w1", env={"LABEL_STUDIO_API_KEY": ""})  # a worker that cannot reach Label Studio's API

    retrieve(backend, ls, project, task_ids)

    status = wait_until(
        lambda: (s := progress(backend, project))["state"] == "finished" and s, 300, "selection"
    )
    assert (status["done"], status["failed"]) == (0, TASKS)
    [(reason, count)] = status["failures"].items()
    assert count == TASKS and "LABEL_STUDIO_API_KEY is not set" in reason


def test_overlapping_selections_write_each_task_once(
    backend, ls, label_studio, image_server, start_worker, redis_conn, wait_until
):
    project, task_ids = boxed_project(ls, image_server, "selections overlapping", TASKS)
    retrieve(backend, ls, project, task_ids[:20])  # Retrieve predictions, then again on an overlapping
    retrieve(backend, ls, project, task_ids[10:])  # selection before the first one ran
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    start_worker.many("w1", "w2", env=env)

    wait_until(lambda: get_queue(PRELABEL, redis_conn).count == 0, 300, "every chunk taken")
    status = wait_until(
        lambda: (s := progress(backend, project))["state"] == "finished" and s, 300, "the second selection"
    )
    assert status["total"] == TASKS - 10 and status["failed"] == 0
    counts = wait_until(
        lambda: (c := [len(t["predictions"]) for t in ls.get_tasks(project, task_ids)]) and min(c) and c,
        300,
        "every task predicted",
    )
    assert counts == [1] * TASKS


def test_a_prediction_is_claimed_by_one_chunk_and_released_when_its_write_fails(redis_conn):
    assert claim_prediction(redis_conn, 1, 7, "v1", "sel-a-c0")
    assert claim_prediction(redis_conn, 1, 7, "v1", "sel-a-c0")  # its own retry
    assert not claim_prediction(redis_conn, 1, 7, "v1", "sel-b-c3")
    assert claim_prediction(redis_conn, 1, 7, "v2", "sel-b-c3")  # another model version
    release_prediction(redis_conn, 1, 7, "v1", "sel-b-c3")  # not its claim: nothing changes
    assert not claim_prediction(redis_conn, 1, 7, "v1", "sel-b-c3")
    release_prediction(redis_conn, 1, 7, "v1", "sel-a-c0")
    assert claim_prediction(redis_conn, 1, 7, "v1", "sel-b-c3")
