"""The worker's parts that need no Redis: describe requests, failure classes, the model host, the job in-process,
and the JSON log lines. The same code runs in real worker processes in tests/integration/test_worker*.py.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import requests
from PIL import Image
from rq import SimpleWorker
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import JobTimeoutException
from standin_label_studio import API_KEY, StandInLabelStudio, serve_in_thread
from tiny_adapters import random_adapter
from tiny_models import make_tiny, noise_image

from backend.images import ImageRejected, ImageUnavailable
from backend.ls_client import LabelStudioError
from backend.queues import PRELABEL, SERIALIZER, connect, get_queue
from backend.selections import cancel_selection, selection_status, start_selection
from backend.settings import Settings
from devstack.redis_server import EmbeddedRedis
from roi_contract.describe import DescribeRequest
from roi_model.assembly import save_pretrained
from roi_model.engine import RegionEngine
from worker.failures import is_transient
from worker.jobs import (
    _failure,
    check_question_lengths,
    describe_regions,
    engine_request,
    prelabel_chunk,
    prelabel_chunk_failed,
    prelabel_tasks,
)
from worker.logs import JsonLinesFormatter
from worker.model_host import ModelHost, NoModelServed
from worker.process_context import WorkerContext, activate, current
from worker.registry import ModelRegistry


def request(**changes) -> dict:
    base = {
        "image": {"url": "scene.png", "task_id": 17},
        "regions": [{"id": "r1", "box": [0.1, 0.2, 0.45, 0.6]}, {"id": "r2", "box": [0.5, 0.5, 0.9, 0.9]}],
        "questions": [
            {"id": "r1:caption", "text": "Describe <region1> briefly.", "regions": ["r1"]},
            {"id": "pair", "text": "Is <region1> left of <region2>?", "regions": ["r2", "r1"]},
        ],
        "max_new_tokens": 8,
    }
    return {**base, **changes}


# --- which failures are retried -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ImageUnavailable("a.png", "HTTP 503 from http://x/a.png"), True),
        (ImageRejected("a.png", "not an image"), False),
        (LabelStudioError("get tasks", None, "ConnectError"), True),
        (LabelStudioError("get tasks", 502, "bad gateway"), True),
        (LabelStudioError("get tasks", 429, "slow down"), True),
        (LabelStudioError("get project", 404, "not found"), False),
        (LabelStudioError("create prediction", 500, "server error"), True),
        (LabelStudioError("create prediction", 503, "unavailable"), True),
        (LabelStudioError("create prediction", 504, "gateway timeout"), True),
        (LabelStudioError("create prediction", 400, "result: invalid"), False),
        (LabelStudioError("create prediction", 401, "no token"), False),
        (LabelStudioError("create prediction", 403, "forbidden"), False),
        (LabelStudioError("create prediction", 428, "just below 429"), False),
        (LabelStudioError("create prediction", 430, "just above 429"), False),
        (LabelStudioError("create prediction", 499, "just below 500"), False),
        (redis.ConnectionError("reset"), True),
        (redis.TimeoutError("timeout"), True),
        (requests.ConnectionError("refused"), True),
        (ConnectionResetError("reset by peer"), True),
        (ValueError("zero area"), False),
        (JobTimeoutException("took too long"), False),
        (KeyError("bug"), False),
    ],
)
def test_only_failures_that_may_pass_are_transient(error, transient):
    assert is_transient(error) is transient


# --- the model host -------------------------------------------------------------------------------------


class CountingLoader:
    """Stands in for RegionEngine.from_pretrained: records loads, fails for directories named in `broken`."""

    def __init__(self, broken: set[str] = frozenset()):
        self.loaded: list[str] = []
        self.broken = broken

    def __call__(self, directory: Path):
        if directory.name in self.broken:
            raise OSError(f"{directory}/model.safetensors is truncated")
        self.loaded.append(directory.name)
        return SimpleNamespace(name=directory.name, device=SimpleNamespace(type="cpu"))


def registry_with(tmp_path: Path, *versions: str) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "models")
    for version in versions:
        source = tmp_path / f"src-{version}"
        source.mkdir()
        (source / "config.json").write_text("{}")
        registry.publish(source, version=version)
    return registry


def test_the_host_loads_once_and_swaps_when_current_moves(tmp_path):
    registry = registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    loader = CountingLoader()
    host = ModelHost(registry, loader=loader)

    assert host.load() == "v1"
    assert not host.stale() and host.refresh() is False
    registry.promote("v2")
    assert host.stale()
    assert host.refresh() is True
    assert (host.version, host.engine.name, loader.loaded) == ("v2", "v2", ["v1", "v2"])
    registry.rollback()
    assert host.refresh() is True and host.version == "v1"


def test_a_version_that_cannot_load_leaves_the_served_one_and_is_not_retried(tmp_path, caplog):
    registry = registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    loader = CountingLoader(broken={"v2"})
    host = ModelHost(registry, loader=loader)
    host.load()

    registry.promote("v2")
    with caplog.at_level(logging.ERROR, logger="worker.model_host"):
        assert host.refresh() is False
    assert host.version == "v1" and loader.loaded == ["v1", "v1"]
    assert "model version v2 cannot be loaded" in caplog.text and "truncated" in caplog.text
    assert not host.stale() and host.refresh() is False
    assert loader.loaded == ["v1", "v1"]


def test_without_a_current_version_the_host_refuses_with_one_sentence(tmp_path):
    host = ModelHost(registry_with(tmp_path, "v1"), loader=CountingLoader())
    with pytest.raises(NoModelServed, match=r"no model version is being served: .*current does not exist"):
        host.load()
    with pytest.raises(NoModelServed, match=r"call ModelHost\.load"):
        host.engine  # noqa: B018


# --- the describe job in this process -------------------------------------------------------------------


def serve_tiny(tmp_path, version: str) -> tuple[Path, ModelHost]:
    """A model host serving a tiny model as `version`, and a local files root holding scene.png."""
    model, processor = make_tiny("clip")
    save_pretrained(model, processor, tmp_path / "tiny")
    registry = ModelRegistry(tmp_path / "models")
    registry.import_model(tmp_path / "tiny", version=version)
    files = tmp_path / "files"
    files.mkdir()
    noise_image(64, 48).save(files / "scene.png")
    host = ModelHost(registry)
    host.load()
    return files, host


def test_describe_regions_answers_like_the_engine_and_checks_the_request_first(tmp_path):
    files, host = serve_tiny(tmp_path, "v7")
    registry = host.registry
    activate(WorkerContext(Settings(local_files_root=files), host=host))
    try:
        result = describe_regions(request())
        with pytest.raises(ValueError, match="has zero area"):  # before the (missing) image is read
            zero_area = request(
                regions=[{"id": "r1", "box": [0.4, 0.2, 0.4, 0.7]}, {"id": "r2", "box": [0.5, 0.5, 0.9, 0.9]}]
            )
            describe_regions(zero_area | {"image": {"url": "nowhere.png"}})
        long_question = "Is <region1> " + "a " * 600 + "red?"
        with pytest.raises(ValueError, match=r"question 'q' is \d+ tokens long; at most 512 are answered"):
            describe_regions(request(questions=[{"id": "q", "text": long_question, "regions": ["r1"]}]))
    finally:
        activate(None)

    parsed = DescribeRequest.model_validate(request())
    with Image.open(files / "scene.png") as image:
        [answers] = RegionEngine.from_pretrained(registry.path("v7")).answer([engine_request(parsed, image)])
    assert result == {
        "model_version": "v7",
        "answers": [
            {
                "id": "r1:caption",
                "text": answers[0].text,
                "score": pytest.approx(answers[0].score, abs=1e-5),
                "truncated": answers[0].truncated,
            },
            {
                "id": "pair",
                "text": answers[1].text,
                "score": pytest.approx(answers[1].score, abs=1e-5),
                "truncated": answers[1].truncated,
            },
        ],
    }
    with pytest.raises(NoModelServed, match="job functions run inside roi-worker"):
        current()


def test_describe_regions_answers_as_the_project_is_served_and_fetches_a_cloud_image_once(tmp_path):
    """The project's adapter answers a project's request; a cloud URI is presigned through its task, and a
    second box on the same image (what an annotator draws next) reuses the bytes fetched for the first."""
    files, host = serve_tiny(tmp_path, "v7")
    lineage = host.registry.lineage(5)
    adapter = random_adapter(host.engine.model.language_model, tmp_path / "adapter", seed=3)
    lineage.promote(lineage.publish(adapter, extra={"base": "v7", "project": 5}))
    label_studio = StandInLabelStudio()
    label_studio.serve(
        "/tasks/17/presign/", (files / "scene.png").read_bytes(), {"Content-Type": "image/png"}
    )
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=API_KEY)
    activate(WorkerContext(settings, host=host))
    cloud = {"url": "s3://bucket/scene-of-the-describe-test.png", "task_id": 17}
    try:
        first = describe_regions(request(image=cloud, project=5))
        second = describe_regions(request(image=cloud, project=5, max_new_tokens=4))
        base = describe_regions(request(image=cloud))
        with pytest.raises(ValueError, match=r"^describe request: "):
            describe_regions(request(max_new_tokens="many"))
    finally:
        activate(None)
        label_studio.close()

    assert label_studio.requests == [("/tasks/17/presign/", f"Token {API_KEY}")]
    assert first["model_version"] == second["model_version"] == "v7+p5-v1"
    assert base["model_version"] == "v7"
    assert [a["text"] for a in first["answers"]] != [a["text"] for a in base["answers"]]


# --- prelabel_tasks against a stand-in Label Studio -----------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[2] / "labeling_configs"
CAPTION_CONFIG = (CONFIGS / "region_captioning.xml").read_text()


class PredictionStore:
    """The Label Studio endpoints prelabel_tasks calls, on 127.0.0.1: one project, its tasks (the selected
    ones, with the predictions stored since), a prediction endpoint that answers `write_status[task]`
    (201: stored) for each task's prediction, and the presign endpoint of cloud URIs, answering `image`."""

    def __init__(
        self, project: dict, tasks: list[dict], write_status: dict[int, int], image: bytes = b""
    ) -> None:
        self.stored: dict[int, dict] = {}
        self.writes: Counter = Counter()
        self.presigned: list[int] = []
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                presign = re.fullmatch(r"/tasks/(\d+)/presign/", path)
                if path == f"/api/projects/{project['id']}/":
                    self.reply(200, project)
                elif presign and image:
                    store.presigned.append(int(presign[1]))
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.write(image)
                elif path == "/api/tasks/":
                    query = json.loads(parse_qs(urlsplit(self.path).query)["query"][0])
                    asked_project = parse_qs(urlsplit(self.path).query)["project"][0]
                    wanted = (
                        set(query["selectedItems"]["included"]) if asked_project == str(project["id"]) else ()
                    )
                    found = [
                        task
                        | {
                            "predictions": [
                                *task["predictions"],
                                *([store.stored[task["id"]]] if task["id"] in store.stored else []),
                            ]
                        }
                        for task in tasks
                        if task["id"] in wanted
                    ]
                    self.reply(200, {"tasks": found, "total": len(found)})
                else:
                    self.reply(404, {"detail": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if urlsplit(self.path).path != "/api/predictions/":
                    self.reply(404, {"detail": "not found"})
                    return
                task = body["task"]
                store.writes[task] += 1
                status = write_status.get(task, 201)
                if status == 201:
                    store.stored[task] = body
                    self.reply(201, {"id": 100 + task, **body})
                else:
                    self.reply(status, {"detail": f"cannot store the prediction (HTTP {status})"})

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd, self.url = serve_in_thread(Handler)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def annotated_task(task_id: int) -> dict:
    box = {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": ["Object"]}
    rectangle = {
        "id": "b1",
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": box,
    }
    return {
        "id": task_id,
        "data": {"image": "scene.png"},
        "annotations": [{"id": task_id * 10, "result": [rectangle], "created_at": "2026-01-01T00:00:00Z"}],
        "predictions": [],
    }


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """serve_tiny as v1, built once for the module."""
    return serve_tiny(tmp_path_factory.mktemp("served"), "v1")


def prelabel_with(served_model, write_status: dict[int, int]) -> tuple[PredictionStore, Callable[[], dict]]:
    files, host = served_model
    store = PredictionStore(
        {"id": 3, "title": "captions", "label_config": CAPTION_CONFIG},
        [annotated_task(17), annotated_task(18)],
        write_status,
    )
    settings = Settings(
        label_studio_url=store.url, label_studio_api_key=API_KEY, local_files_root=files, max_new_tokens=4
    )
    activate(WorkerContext(settings, host=host))
    return store, lambda: prelabel_tasks(3, [17, 18])


def test_a_transient_label_studio_error_while_writing_a_prediction_retries_the_job(served_model):
    status = 503  # the SDK retries it twice, then gives up: prelabel_tasks must hand it to RQ
    store, prelabel = prelabel_with(served_model, {18: status})
    try:
        with pytest.raises(LabelStudioError) as failure:
            prelabel()
    finally:
        activate(None)
        store.close()

    assert failure.value.status_code == status and is_transient(failure.value)  # RQ retries the job
    assert set(store.stored) == {17}  # what was written before stays written; a retry skips it
    assert store.stored[17]["model_version"] == "v1"


def test_project_settings_that_do_not_parse_are_refused_by_name(served_model):
    store, _ = prelabel_with(served_model, {})
    try:
        with pytest.raises(ValueError, match=r"^project settings: "):
            prelabel_tasks(3, [17], {"prompts": "describe everything"})
    finally:
        activate(None)
        store.close()
    assert store.writes == Counter()


def prelabel_project(
    served_model, config: str, tasks: list[dict], given: list[int] | None = None, **settings_changes
) -> tuple[PredictionStore, dict]:
    """prelabel_tasks of the `given` tasks (default: all), on a stand-in Label Studio holding `tasks`; the
    store and the summary."""
    files, host = served_model
    store = PredictionStore(
        {"id": 3, "title": "project", "label_config": config},
        tasks,
        {},
        image=(files / "scene.png").read_bytes(),
    )
    chosen = {"label_studio_api_key": API_KEY, "max_new_tokens": 4} | settings_changes
    settings = Settings(label_studio_url=store.url, local_files_root=files, **chosen)
    activate(WorkerContext(settings, host=host))
    try:
        summary = prelabel_tasks(3, given if given is not None else [task["id"] for task in tasks])
    finally:
        activate(None)
        store.close()
    return store, summary


def caption_of(prediction: dict) -> str:
    [answer] = [item for item in prediction["result"] if item["type"] == "textarea"]
    return answer["value"]["text"][0]


def test_prelabel_presigns_cloud_images_through_their_task_and_answers_within_the_token_limit(served_model):
    tasks = [annotated_task(task_id) for task_id in (17, 21)]
    for task in tasks:
        task["data"]["image"] = f"s3://bucket/scene-{task['id']}.png"
    short, summary = prelabel_project(served_model, CAPTION_CONFIG, tasks, max_new_tokens=2)
    longer, _ = prelabel_project(served_model, CAPTION_CONFIG, tasks, max_new_tokens=8)

    assert (summary["predicted"], summary["failed"]) == (2, [])
    assert sorted(short.presigned) == [17, 21]
    for task_id, prediction in short.stored.items():
        assert prediction["model_version"] == "v1" and 0.0 < prediction["score"] <= 1.0
        [rectangle] = [item for item in prediction["result"] if item["type"] == "rectanglelabels"]
        assert rectangle["value"]["x"] == pytest.approx(10) and rectangle["value"]["width"] == pytest.approx(
            30
        )
        assert len(caption_of(prediction)) < len(caption_of(longer.stored[task_id]))


def test_prelabel_answers_the_question_typed_for_each_region(served_model):
    config = (CONFIGS / "region_qa.xml").read_text()
    task = annotated_task(17)
    [rectangle] = task["annotations"][0]["result"]
    task["annotations"][0]["result"].append(
        {
            **rectangle,
            "from_name": "question",
            "type": "textarea",
            "value": {**rectangle["value"], "text": ["What colour is <region1>?"]},
        }
    )
    store, summary = prelabel_project(served_model, config, [task])

    assert (summary["predicted"], summary["failed"]) == (1, [])
    answer = [item for item in store.stored[17]["result"] if item["from_name"] == "answer"]
    assert [item["id"] for item in answer] == ["b1"]


class RecordedProgress:
    """worker.job_progress.JobProgress, recording every report (outside a job the real one records none)."""

    reports: ClassVar[list[tuple[str, dict]]] = []

    def report(self, stage: str, **fields) -> None:
        self.reports.append((stage, fields))


def test_prelabel_accounts_for_every_task_it_was_given(served_model, monkeypatch, caplog):
    """One call, every outcome: predicted (no prediction yet, or one of another version), skipped (one of
    this version already; no region), failed (no such task; an image that cannot be read). The summary and
    the log line name each, progress is reported per group of tasks, and the engine's caches keep nothing
    of a bulk pre-label."""
    _, host = served_model
    earlier = {"model_version": "v1", "result": [], "score": 0.5}
    tasks = [annotated_task(task_id) for task_id in (17, 21, 22, 23, 24, 25, 26)]
    tasks[0]["predictions"] = tasks[1]["predictions"] = [earlier]  # 17, 21: predicted by v1 already
    tasks[2]["predictions"] = [earlier | {"model_version": "v0"}]  # 22: by another version only
    tasks[3]["annotations"] = tasks[4]["annotations"] = []  # 23, 24: no region
    tasks[5]["data"]["image"] = tasks[6]["data"]["image"] = "missing.png"  # 25, 26: no such file
    monkeypatch.setattr("worker.jobs.JobProgress", RecordedProgress)
    RecordedProgress.reports = []
    caches = host.engine.stats()
    with caplog.at_level(logging.INFO, logger="worker.jobs"):
        store, summary = prelabel_project(
            served_model, CAPTION_CONFIG, tasks, given=[19, *[t["id"] for t in tasks]], prelabel_chunk_tasks=3
        )

    assert set(store.stored) == {22}
    failed = {f["task"]: f for f in summary["failed"]}
    assert {k: v for k, v in summary.items() if k != "failed"} == {
        "predicted": 1,
        "skipped_existing": 2,
        "skipped_no_regions": 2,
        "model_version": "v1",
    }
    assert failed[19] == {"task": 19, "reason": "project 3 has no task 19", "kind": "no such task"}
    assert set(failed) == {19, 25, 26} and failed[25]["kind"] == failed[26]["kind"]
    assert "missing.png" in failed[25]["reason"]
    assert RecordedProgress.reports == [
        ("answering", {"done": done, "total": 8}) for done in (0, 3, 3, 6, 6, 8)
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "worker.jobs"] == [
        f"prelabel project=3 {summary}"
    ]
    after = host.engine.stats()
    assert after["feature_cache"]["bytes"] == caches["feature_cache"]["bytes"]
    assert after["prefix_cache"]["bytes"] == caches["prefix_cache"]["bytes"]


def test_prelabel_writes_into_the_controls_the_project_settings_name(served_model):
    """Two per-region TextAreas: by document order the config reads as region QA (notes: the question typed
    per region, none typed here, so nothing to ask), unless the project's settings name the answer."""
    config = CAPTION_CONFIG.replace(
        '<TextArea name="caption"',
        '<TextArea name="notes" toName="image" perRegion="true" editable="true"/>\n  <TextArea name="caption"',
    )
    files, host = served_model
    store = PredictionStore({"id": 3, "title": "two", "label_config": config}, [annotated_task(17)], {})
    settings = Settings(
        label_studio_url=store.url, label_studio_api_key=API_KEY, local_files_root=files, max_new_tokens=4
    )
    activate(WorkerContext(settings, host=host))
    try:
        by_default = prelabel_tasks(3, [17])
        store.stored.clear()
        chosen = prelabel_tasks(3, [17], {"controls": {"answer": "caption"}})
    finally:
        activate(None)
        store.close()

    assert (by_default["predicted"], by_default["skipped_no_regions"]) == (0, 1)
    assert chosen["predicted"] == 1
    [answer] = [item for item in store.stored[17]["result"] if item["type"] == "textarea"]
    assert answer["from_name"] == "caption"


def test_one_task_at_a_time_when_the_settings_say_so(served_model, monkeypatch):
    monkeypatch.setattr("worker.jobs.JobProgress", RecordedProgress)
    RecordedProgress.reports = []
    _, summary = prelabel_project(
        served_model, CAPTION_CONFIG, [annotated_task(17), annotated_task(21)], prelabel_chunk_tasks=1
    )
    assert summary["predicted"] == 2
    assert RecordedProgress.reports == [("answering", {"done": done, "total": 2}) for done in (0, 1, 1, 2)]


class WordTokenizer:
    """A tokenizer of one token per word: questions of an exact length in tokens."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(range(len(text.split())))}


def test_a_question_of_the_longest_length_is_answered_and_one_token_more_is_not():
    longest = request(questions=[{"id": "q", "text": "<region1>" + " w" * 511, "regions": ["r1"]}])
    check_question_lengths(DescribeRequest.model_validate(longest), WordTokenizer())
    too_long = request(questions=[{"id": "q", "text": "<region1>" + " w" * 512, "regions": ["r1"]}])
    with pytest.raises(ValueError, match="question 'q' is 513 tokens long; at most 512 are answered"):
        check_question_lengths(DescribeRequest.model_validate(too_long), WordTokenizer())


def test_prelabel_answers_with_the_project_adapter(tmp_path):
    files, host = serve_tiny(tmp_path, "v1")
    lineage = host.registry.lineage(3)
    adapter = random_adapter(host.engine.model.language_model, tmp_path / "adapter", seed=3)
    lineage.promote(lineage.publish(adapter, extra={"base": "v1", "project": 3}))
    store, summary = prelabel_project((files, host), CAPTION_CONFIG, [annotated_task(17)])
    assert summary["model_version"] == store.stored[17]["model_version"] == "v1+p3-v1"


@pytest.mark.parametrize(
    ("project_id", "task_ids", "refusal"),
    [
        ("3", [17], "project_id must be an integer, got '3'"),
        (True, [17], "project_id must be an integer, got True"),
        (3, "17", "task_ids must be a list of integers, got '17'"),
        (3, (17,), r"task_ids must be a list of integers, got \(17,\)"),
        (3, [17, True], r"task_ids must be a list of integers, got \[17, True\]"),
        (3, [17, "18"], r"task_ids must be a list of integers, got \[17, '18'\]"),
    ],
)
def test_ids_that_are_not_integers_are_refused_by_name(project_id, task_ids, refusal):
    with pytest.raises(ValueError, match=f"^{refusal}$"):
        prelabel_tasks(project_id, task_ids)


def test_prelabel_without_an_api_key_refuses_before_reading_anything(served_model):
    with pytest.raises(ValueError, match=r"^LABEL_STUDIO_API_KEY is not set: prelabeling reads tasks"):
        prelabel_project(served_model, CAPTION_CONFIG, [annotated_task(17)], label_studio_api_key="")


def test_a_reasoning_answer_is_written_in_the_numbering_of_the_task_question(served_model):
    """The question names boxes 2 and 3 of three: the job asks about them as region1 and region2, and the
    answer's references are written back as the task's own numbers."""
    from backend.describe_jobs import describe_request
    from backend.labeling import scheme_from_config
    from backend.ls_client import LabelStudioClient
    from backend.regions import task_regions
    from roi_contract.project import Prompts
    from worker.jobs import _PlannedTask, _write_prediction, _WriteClaims

    scheme = scheme_from_config((CONFIGS / "multi_region_reasoning.xml").read_text())
    task = annotated_task(17)
    [first] = task["annotations"][0]["result"]
    task["annotations"][0]["result"] = [
        first,
        {**first, "id": "b2", "value": {**first["value"], "x": 50}},
        {**first, "id": "b3", "value": {**first["value"], "y": 5}},
    ]
    task["data"]["question"] = "Is <region2> above <region3>?"
    regions, source = task_regions(task, scheme)
    request = describe_request(task, regions, scheme, Prompts(), source_result=source, max_new_tokens=8)
    store = PredictionStore({"id": 3, "title": "reasoning", "label_config": ""}, [task], {})
    summary = {"predicted": 0, "skipped_existing": 0, "failed": []}
    answer = SimpleNamespace(text="No, region1 is below region2.", score=-0.1, truncated=False)
    try:
        _write_prediction(
            LabelStudioClient(store.url, API_KEY),
            scheme,
            _PlannedTask(17, regions, request, image=None),
            [answer],
            "v1",
            summary,
            _WriteClaims(None, 3, "v1", None),
        )
    finally:
        store.close()

    assert summary["predicted"] == 1
    assert caption_of(store.stored[17]) == "No, region2 is below region3."


def test_a_permanent_label_studio_error_while_writing_lists_the_task_as_failed(served_model):
    store, prelabel = prelabel_with(served_model, {18: 400})
    try:
        summary = prelabel()
    finally:
        activate(None)
        store.close()

    assert (summary["predicted"], set(store.stored)) == (1, {17})
    [failed] = summary["failed"]
    assert failed["task"] == 18 and "HTTP 400" in failed["reason"]
    assert store.writes[18] == 1  # a refusal is not retried


# --- chunks of a selection, run by an RQ worker on a real redis-server -----------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def connection(redis_server) -> Iterator[redis.Redis]:
    client = connect(Settings(redis_url=redis_server.url))
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


def run_selection(connection, served_model, store, task_ids, **selection) -> str:
    """Plan a selection of project 3 and run its chunks in this process, as a prelabel worker would."""
    files, host = served_model
    settings = Settings(
        label_studio_url=store.url, label_studio_api_key=API_KEY, local_files_root=files, max_new_tokens=4
    )
    status = start_selection(
        connection,
        3,
        task_ids,
        chunk_tasks=selection.get("chunk_tasks", 8),
        job_name="worker.jobs.prelabel_chunk",
        project_settings=selection.get("project_settings"),
        failure_callback="worker.jobs.prelabel_chunk_failed",
    )
    if selection.get("cancel"):
        cancel_selection(connection, status["selection"])
    activate(WorkerContext(settings, connection=connection, host=host))
    try:
        SimpleWorker([get_queue(PRELABEL, connection)], connection=connection, serializer=SERIALIZER).work(
            burst=True
        )
    finally:
        activate(None)
    return status["selection"]


def claim_of(connection, task_id: int) -> bytes | None:
    return connection.get(f"roi:prediction:3:{task_id}:v1")


def test_a_chunk_writes_claims_and_counts_each_task_once_into_its_selection(connection, served_model):
    tasks = [annotated_task(17), annotated_task(18), annotated_task(20) | {"annotations": []}]
    store = PredictionStore({"id": 3, "title": "captions", "label_config": CAPTION_CONFIG}, tasks, {18: 400})
    try:
        selection = run_selection(connection, served_model, store, [17, 18, 19, 20], chunk_tasks=2)
        status = selection_status(connection, selection)
        # the same tasks again, in a selection of their own: 17 is written already, 18 is tried again
        again = run_selection(connection, served_model, store, [18, 17])
    finally:
        store.close()

    assert {k: status[k] for k in ("state", "total", "done", "failed", "chunks", "chunks_ended")} == {
        "state": "finished",
        "total": 4,
        "done": 2,  # 17 predicted, 20 has no region
        "failed": 2,
        "chunks": 2,
        "chunks_ended": 2,
    }
    assert status["failures"] == {  # by kind: no task ids or status codes in the reason
        "no such task": 1,
        "Label Studio create prediction for task …: HTTP …: cannot store the prediction (HTTP …)": 1,
    }
    assert set(store.stored) == {17} and store.stored[17]["model_version"] == "v1"
    assert claim_of(connection, 17) == f"{selection}-c0".encode()  # the chunk that wrote it
    assert claim_of(connection, 18) is None  # its write failed for good: the claim is given back
    assert store.writes == Counter({17: 1, 18: 2})  # 18 tried by both selections, 17 written once
    second = selection_status(connection, again)
    assert (second["done"], second["failed"]) == (1, 1)
    job = Job.fetch(f"{again}-c0", connection=connection, serializer=SERIALIZER)
    summary = job.return_value()
    assert (summary["predicted"], summary["skipped_existing"], len(summary["failed"])) == (0, 1, 1)


def test_tasks_claimed_by_another_selection_are_not_written_twice(connection, served_model):
    store = PredictionStore(
        {"id": 3, "title": "captions", "label_config": CAPTION_CONFIG},
        [annotated_task(17), annotated_task(21)],
        {},
    )
    for task_id in (17, 21):  # claimed by a chunk of an overlapping selection
        connection.set(f"roi:prediction:3:{task_id}:v1", "sel-3-other-c0")
    try:
        selection = run_selection(connection, served_model, store, [17, 21])
    finally:
        store.close()

    assert store.writes == Counter()
    summary = Job.fetch(f"{selection}-c0", connection=connection, serializer=SERIALIZER).return_value()
    assert (summary["predicted"], summary["skipped_existing"]) == (0, 2)
    assert selection_status(connection, selection)["done"] == 2
    assert claim_of(connection, 17) == claim_of(connection, 21) == b"sel-3-other-c0"  # neither taken over


def test_a_chunk_whose_project_settings_do_not_parse_fails_and_counts_its_tasks(connection, served_model):
    store = PredictionStore(
        {"id": 3, "title": "captions", "label_config": CAPTION_CONFIG}, [annotated_task(17)], {}
    )
    try:
        selection = run_selection(
            connection, served_model, store, [17, 18], project_settings={"prompts": "x"}
        )
    finally:
        store.close()

    assert store.writes == Counter()
    status = selection_status(connection, selection)
    [reason] = status["failures"]
    assert reason.startswith("the chunk failed: ContractError: project settings: prompts")
    assert (status["state"], status["failed"], status["failures"][reason]) == ("finished", 2, 2)


def test_prelabel_tasks_outside_a_job_writes_without_claims(connection, served_model):
    """Called directly (no RQ job, so no chunk to own a claim) with a Redis connection at hand: no claim is
    taken or given back, and a failed write is listed."""
    files, host = served_model
    store = PredictionStore(
        {"id": 3, "title": "captions", "label_config": CAPTION_CONFIG},
        [annotated_task(17), annotated_task(18)],
        {18: 400},
    )
    settings = Settings(
        label_studio_url=store.url, label_studio_api_key=API_KEY, local_files_root=files, max_new_tokens=4
    )
    activate(WorkerContext(settings, connection=connection, host=host))
    try:
        summary = prelabel_tasks(3, [17, 18])
    finally:
        activate(None)
        store.close()

    assert (summary["predicted"], [f["task"] for f in summary["failed"]]) == (1, [18])
    assert connection.keys("roi:prediction:*") == []


def test_a_chunk_of_a_cancelled_selection_writes_nothing_and_ends(connection, served_model):
    store = PredictionStore(
        {"id": 3, "title": "captions", "label_config": CAPTION_CONFIG}, [annotated_task(17)], {}
    )
    _, host = served_model
    try:
        selection = run_selection(connection, served_model, store, [17], cancel=True)
        # a chunk that a worker had taken before the cancel runs all the same: it must stop at once
        activate(WorkerContext(Settings(label_studio_url=store.url), connection=connection, host=host))
        try:
            assert prelabel_chunk(3, selection, 0, [17]) == {"cancelled": True}
        finally:
            activate(None)
    finally:
        store.close()

    assert store.writes == Counter()
    status = selection_status(connection, selection)
    assert {k: status[k] for k in ("state", "done", "failed", "chunks_ended")} == {
        "state": "cancelled",
        "done": 0,
        "failed": 0,
        "chunks_ended": 1,
    }


def chunk_job(connection, *, retries_left: int | None) -> tuple[str, Job]:
    status = start_selection(
        connection,
        3,
        [17, 18, 19],
        chunk_tasks=8,
        job_name="worker.jobs.prelabel_chunk",
        project_settings=None,
    )
    job = Job.fetch(f"{status['selection']}-c0", connection=connection, serializer=SERIALIZER)
    job.retries_left = retries_left
    return status["selection"], job


@pytest.mark.parametrize(
    "error",
    [
        LabelStudioError("create prediction", 503, "unavailable"),
        AbandonedJobError("the worker died"),
        requests.ConnectionError("connection refused"),
    ],
    ids=["label-studio-503", "worker-died", "connection-refused"],
)
def test_a_chunk_that_will_be_retried_is_not_counted_yet(connection, error):
    selection, job = chunk_job(connection, retries_left=1)
    prelabel_chunk_failed(job, connection, type(error), error, None)
    status = selection_status(connection, selection)
    assert (status["failed"], status["chunks_ended"], status["failures"]) == (0, 0, {})


@pytest.mark.parametrize("retries_left", [None, 0, 1])
def test_a_chunk_that_failed_for_good_counts_all_its_tasks_as_failed_with_the_error(connection, retries_left):
    selection, job = chunk_job(connection, retries_left=retries_left)
    error = ValueError("the label config has no RectangleLabels " + "x" * 400)
    if retries_left:  # a permanent error is not retried, retries left or not
        assert not is_transient(error)
    prelabel_chunk_failed(job, connection, ValueError, error, None)
    prelabel_chunk_failed(job, connection, ValueError, error, None)  # RQ may call it again: counted once
    status = selection_status(connection, selection)
    reason = f"the chunk failed: ValueError: {error}"[:300]
    assert len(reason) == 300
    assert (status["state"], status["failed"], status["done"], status["failures"]) == (
        "finished",
        3,
        0,
        {reason: 3},
    )


def test_a_transient_error_counts_the_chunk_as_failed_once_its_retries_are_spent(connection):
    selection, job = chunk_job(connection, retries_left=0)
    error = LabelStudioError("create prediction", 503, "unavailable")
    prelabel_chunk_failed(job, connection, LabelStudioError, error, None)
    status = selection_status(connection, selection)
    assert status["failures"] == {f"the chunk failed: LabelStudioError: {error}"[:300]: 3}


def test_a_failure_is_counted_by_its_kind_without_urls_paths_or_numbers():
    error = ValueError("task 12 at http://ls:8080/data/upload/3/a.png has 3 boxes; see /data/media/x")
    assert _failure(12, error) == {
        "task": 12,
        "reason": str(error),
        "kind": "task … at … has … boxes; see …",
    }
    rejected = ImageRejected("http://ls:8080/data/upload/3/a.png", "HTTP 404 for 2 tries")
    assert _failure(4, rejected) == {"task": 4, "reason": str(rejected), "kind": "HTTP … for … tries"}
    assert _failure(1, ValueError("y" * 500))["kind"] == "y" * 200


# --- logs -----------------------------------------------------------------------------------------------


def test_log_lines_are_json_with_the_extra_fields_and_the_traceback():
    logger = logging.getLogger("test.worker.logs")
    record = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, "job %s failed", ("j1",), None, extra={"job": "j1", "n": 2}
    )
    try:
        raise ValueError("zero area")
    except ValueError:
        record.exc_info = sys.exc_info()

    entry = json.loads(JsonLinesFormatter().format(record))

    assert {k: entry[k] for k in ("level", "logger", "msg", "job", "n")} == {
        "level": "warning",
        "logger": "test.worker.logs",
        "msg": "job j1 failed",
        "job": "j1",
        "n": 2,
    }
    assert "ValueError: zero area" in entry["exc"]
    assert entry["ts"].endswith("+00:00")
