"""The worker's parts that need no Redis: describe requests, failure classes, the model host, the job in-process,
and the JSON log lines. The same code runs in real worker processes in tests/integration/test_worker*.py.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

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
from worker.jobs import describe_regions, engine_request
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


def test_describe_regions_answers_like_the_engine_and_checks_the_request_first(tmp_path):
    model, processor = make_tiny("clip")
    save_pretrained(model, processor, tmp_path / "tiny")
    registry = ModelRegistry(tmp_path / "models")
    registry.import_model(tmp_path / "tiny", version="v7")
    files = tmp_path / "files"
    files.mkdir()
    noise_image(64, 48).save(files / "scene.png")
    host = ModelHost(registry)
    host.load()
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
