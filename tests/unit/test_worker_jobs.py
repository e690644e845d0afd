"""The worker's parts that need no Redis: describe requests, failure classes, the model host, the job in-process,
and the JSON log lines. The same code runs in real worker processes in tests/integration/test_worker*.py.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import redis
import requests
from PIL import Image
from rq.timeouts import JobTimeoutException
from tiny_models import make_tiny, noise_image

from backend.images import ImageRejected, ImageUnavailable
from backend.ls_client import LabelStudioError
from backend.settings import Settings
from roi_contract.describe import DescribeRequest
from roi_model.assembly import save_pretrained
from roi_model.engine import RegionEngine
from worker.failures import is_transient
from worker.jobs import describe_regions, engine_request, prelabel_tasks
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


# --- prelabel_tasks against a stand-in Label Studio -----------------------------------------------------

API_KEY = "0123456789abcdef0123456789abcdef01234567"
CAPTION_CONFIG = (
    Path(__file__).resolve().parents[2] / "labeling_configs" / "region_captioning.xml"
).read_text()


class PredictionStore:
    """The Label Studio endpoints prelabel_tasks calls, on 127.0.0.1: one project, its tasks, and a prediction
    endpoint that answers `write_status[task]` (201: stored) for each task's prediction."""

    def __init__(self, project: dict, tasks: list[dict], write_status: dict[int, int]) -> None:
        self.stored: dict[int, dict] = {}
        self.writes: Counter = Counter()
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == f"/api/projects/{project['id']}/":
                    self.reply(200, project)
                elif path == "/api/tasks/":
                    self.reply(200, {"tasks": tasks, "total": len(tasks)})
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

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

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
