"""Malformed input thrown at the backend (against a real Redis) and at the exporter, from a seeded generator.

Each case starts from a body Label Studio really sends and breaks one part of it: a value replaced by one
of another type, a huge or non-finite number, a deep nesting, a long string, a missing key. The backend must
answer 2xx or 4xx with a JSON body, never 500, and log no error or traceback; the exporter must convert or
refuse with a ValueError that names the problem, never crash.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest

from backend.app import JobNames, create_app
from backend.export import convert_tasks
from backend.export_images import StoredImage
from backend.labeling import scheme_from_config
from backend.settings import Settings
from roi_contract.project import Prompts
from tests.integration.backend_harness import config, rectangle

SEED = 20261202
CASES = 250
CAPTION = config("region_captioning.xml")
REGION_QA = config("region_qa.xml")
IMAGE_URL = "/data/upload/3/scene.jpg"
NEVER_RUN = JobNames(describe="tests.no_such.job", prelabel="tests.no_such.job", finetune="tests.no_such.job")


def odd_values(rng: random.Random, deepest: int = 5000) -> list[Any]:
    deep: Any = 1
    for _ in range(rng.choice([50, deepest])):
        deep = [deep]
    return [
        None,
        True,
        0,
        -1,
        10**400,
        1e308,
        float("nan"),
        float("inf"),
        "",
        "x" * rng.choice([10, 100_000]),
        "data:image/png;base64," + "A" * 50_000,
        "http://127.0.0.1:1\\@127.0.0.1:2/data/upload/1/a.png",
        "/data/upload/../../api/projects/",
        [],
        [None, 3, "x"],
        {},
        {"id": "x"},
        deep,
    ]


def paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def mutated(base: Any, rng: random.Random, deepest: int = 5000) -> Any:
    """`base` with one part broken: replaced by an odd value, or (for a dict entry) removed."""
    body = copy.deepcopy(base)
    path = rng.choice([p for p in paths(body) if p])
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(odd_values(rng, deepest))
    return body


def encoded(body: Any) -> bytes:
    try:
        return json.dumps(body).encode()
    except (RecursionError, ValueError):  # 5000 levels deep, or an int too long to print: send it raw
        return ("[" * 5000 + "]" * 5000).encode() if isinstance(body, dict) else b"1" + b"0" * 5000


def caption_item(region_id: str, text: str) -> dict:
    item = rectangle(region_id, 10, 10, 30, 30)
    return {**item, "from_name": "caption", "type": "textarea", "value": {**item["value"], "text": [text]}}


def predict_bodies() -> list[dict]:
    task = {
        "id": 7,
        "data": {"image": IMAGE_URL},
        "annotations": [{"id": 1, "result": [rectangle("a", 10, 10, 30, 30), caption_item("a", "a cat")]}],
        "predictions": [{"id": 2, "result": [rectangle("p", 50, 50, 20, 20)], "model_version": "v1"}],
        "drafts": [],
    }
    batch = {
        "tasks": [task, {**task, "id": 8}],
        "project": "3.1700000000",
        "label_config": CAPTION,
        "params": {},
    }
    drawn = rectangle("n", 20, 20, 10, 10, origin="manual")
    interactive = {**batch, "tasks": [task], "params": {"context": {"result": [drawn]}}}
    return [batch, interactive, {**interactive, "label_config": REGION_QA}]


def webhook_bodies() -> list[dict]:
    annotation = {
        "id": 5,
        "result": [rectangle("a", 1, 1, 5, 5, origin="prediction")],
        "was_cancelled": False,
    }
    return [
        {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": annotation},
        {"action": "ANNOTATIONS_DELETED", "project": {"id": 3}, "annotations": [{"id": 5}]},
        {"action": "START_TRAINING", "project": {"id": 3, "title": "x"}},
    ]


def setup_bodies() -> list[dict]:
    return [
        {
            "project": "3.1700000000",
            "schema": CAPTION,
            "hostname": "http://ls",
            "extra_params": {"train_every": 3},
        }
    ]


@pytest.fixture
def app_client(redis_server):
    settings = Settings(redis_url=redis_server.url, predict_timeout_s=0.05)
    return create_app(settings, job_names=NEVER_RUN).test_client()


@pytest.mark.parametrize(
    ("path", "bodies"),
    [("/predict", predict_bodies()), ("/webhook", webhook_bodies()), ("/setup", setup_bodies())],
    ids=["predict", "webhook", "setup"],
)
def test_malformed_bodies_get_4xx_or_answers_never_500(app_client, caplog, path, bodies):
    rng = random.Random(f"{SEED}:{path}")
    caplog.set_level(logging.WARNING, logger="backend")
    statuses = []
    for case in range(CASES):
        body = mutated(rng.choice(bodies), rng)
        reply = app_client.post(path, data=encoded(body), content_type="application/json")
        statuses.append(reply.status_code)
        assert "Redis" not in (reply.json or {}).get("error", ""), (
            f"case {case}: Redis is up, yet {reply.json}"
        )
        assert reply.status_code < 500 or reply.status_code == 503, (
            f"case {case}: {reply.status_code} {reply.data[:300]!r}"
        )
        assert reply.is_json, f"case {case}: not JSON: {reply.data[:200]!r}"
        if reply.status_code >= 400:
            assert reply.json["error"], f"case {case}: an error without a reason"
    assert any(status == 400 for status in statuses) and any(status != 400 for status in statuses)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    assert errors == [], [record.getMessage()[:300] for record in errors]


def export_tasks() -> list[dict]:
    def annotation(annotation_id: int, text: str) -> dict:
        return {
            "id": annotation_id,
            "result": [rectangle("r1", 10, 10, 30, 30), caption_item("r1", text)],
            "was_cancelled": False,
            "ground_truth": False,
            "updated_at": "2026-01-01T00:00:00Z",
            "completed_by": 1,
        }

    return [
        {"id": 17, "data": {"image": IMAGE_URL}, "annotations": [annotation(42, "a cat")], "predictions": []},
        {
            "id": 18,
            "data": {"image": IMAGE_URL},
            "annotations": [annotation(43, "a dog")],
            "predictions": [9],
        },
    ]


def test_malformed_exports_are_converted_with_counted_skips_or_refused_by_name():
    rng = random.Random(SEED)
    scheme = scheme_from_config(CAPTION)
    images = {IMAGE_URL: StoredImage("images/" + "5f" * 32 + ".jpg", 800, 600)}
    outcomes = {"converted": 0, "refused": 0}
    for case in range(CASES):
        # Parsed JSON from Label Studio: json.loads itself refuses what nests deeper than a few hundred.
        tasks = mutated(export_tasks(), rng, deepest=200)
        try:
            conversion = convert_tasks(tasks, scheme, Prompts(), 3, images)
        except ValueError as refusal:
            assert str(refusal), f"case {case}: a refusal without a reason"
            outcomes["refused"] += 1
            continue
        report = conversion.report
        skipped = sum(len(ids) for ids in report["annotations_skipped"].values())
        assert report["annotations_exported"] + skipped == report["annotations_total"], f"case {case}"
        outcomes["converted"] += 1
    assert outcomes["converted"] and outcomes["refused"], outcomes
