"""backend.predict without Redis: what each task becomes (a describe job, an empty result, an error)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.labeling import scheme_from_config
from backend.predict import (
    describe_job_id,
    empty,
    for_project,
    parse_predict_request,
    plan_batch_task,
)
from backend.selections import selection_id
from roi_contract.project import Prompts

CONFIGS = Path(__file__).resolve().parents[2] / "labeling_configs"
CAPTION = scheme_from_config((CONFIGS / "region_captioning.xml").read_text())
REGION_QA = scheme_from_config((CONFIGS / "region_qa.xml").read_text())
REASONING = scheme_from_config((CONFIGS / "multi_region_reasoning.xml").read_text())
PROMPTS = Prompts()


def rectangle(region_id, x=10, origin=None):
    item = {
        "id": region_id,
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 800,
        "original_height": 600,
        "value": {"x": x, "y": 10, "width": 20, "height": 20, "rotation": 0, "rectanglelabels": ["Object"]},
    }
    if origin:
        item["origin"] = origin
    return item


def task(task_id=1, **fields):
    return {"id": task_id, "data": {"image": "/data/upload/1/a.png"}, **fields}


def test_batch_plan_uses_the_newest_annotation_and_gives_an_empty_result_without_regions():
    annotated = task(
        annotations=[
            {"id": 1, "result": [rectangle("old")], "updated_at": "2024-01-01T00:00:00Z"},
            {"id": 2, "result": [rectangle("a"), rectangle("b", x=60)], "updated_at": "2024-02-01T00:00:00Z"},
        ]
    )

    plan = plan_batch_task(annotated, CAPTION, PROMPTS, 32)
    bare = plan_batch_task(task(annotations=[], predictions=[]), CAPTION, PROMPTS, 32)

    assert [region["id"] for region in plan.request.model_dump()["regions"]] == ["a", "b"]
    assert (bare.request, bare.outcome) == (None, empty())


def test_batch_plan_for_a_task_without_image_is_an_error_item_without_result():
    plan = plan_batch_task(
        {"id": 9, "data": {}, "predictions": [{"result": [rectangle("p")]}]}, CAPTION, PROMPTS, 32
    )

    assert plan.request is None
    assert plan.outcome == {"error": "task 9 has no image URL under 'image' in its data"}


def test_batch_region_qa_asks_the_typed_questions():
    question = {
        "id": "q1",
        "from_name": "question",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": ["what colour is it?"]},
    }
    answered = task(annotations=[{"id": 1, "result": [rectangle("q1"), question, rectangle("q2", x=60)]}])

    plan = plan_batch_task(answered, REGION_QA, PROMPTS, 32)

    assert plan.request.model_dump()["questions"] == [
        {"id": "q1:region_qa", "text": "<region1>: what colour is it?", "regions": ["q1"]}
    ]
    assert [region["id"] for region in plan.request.model_dump()["regions"]] == ["q1"]


def test_job_ids_depend_only_on_the_payload():
    request = plan_batch_task(task(predictions=[{"result": [rectangle("r")]}]), CAPTION, PROMPTS, 32).request
    moved = plan_batch_task(
        task(predictions=[{"result": [rectangle("r", x=11)]}]), CAPTION, PROMPTS, 32
    ).request

    assert describe_job_id(request) == describe_job_id(request.model_copy())
    assert describe_job_id(request) != describe_job_id(moved)
    assert describe_job_id(request).startswith("describe-")
    assert selection_id(3, [2, 1]) == selection_id(3, [1, 2, 2]) != selection_id(4, [1, 2])


def test_a_describe_job_is_asked_for_its_project_and_is_a_job_of_that_project_alone():
    request = plan_batch_task(task(predictions=[{"result": [rectangle("r")]}]), CAPTION, PROMPTS, 32).request
    asked = for_project(request, 3)
    assert (request.project, asked.project) == (None, 3)  # the plan is untouched
    # each project its own job: a finished answer of project 3 (its adapter) is never handed to project 4
    assert (
        describe_job_id(asked)
        == describe_job_id(for_project(request, 3))
        != describe_job_id(for_project(request, 4))
    )


def test_parse_predict_request_tells_interactive_from_batch():
    body = {
        "tasks": [task()],
        "project": "7.1700000000",
        "label_config": "<View/>",
        "params": {"context": None},
    }

    batch = parse_predict_request(body)
    interactive = parse_predict_request({**body, "params": {"context": {"result": [rectangle("r")]}}})

    assert (batch.project_id, batch.interactive) == (7, False)
    assert interactive.interactive
    assert interactive.context_result == [rectangle("r")]


@pytest.mark.parametrize(
    ("task", "error"),
    [
        ("a string", "task 3 is not a JSON object"),
        ({"data": {}}, "task 3 has no integer 'id'"),
        ({"id": True}, "task 3 has no integer 'id'"),
        ({"id": 9, "data": "x", "predictions": [{"result": [rectangle("p")]}]}, "task 9 has no image URL"),
        ({"id": 9, "data": {"image": "a.png"}, "annotations": "x", "predictions": [7, "x"]}, None),
        (
            {
                "id": 9,
                "data": {"image": "a.png"},
                "annotations": [{"result": [{"from_name": "label", "id": "b"}]}],
            },
            "rectangle 'b' has no 'value' object",
        ),
        (
            {
                "id": 9,
                "data": {"image": "a.png"},
                "annotations": [{"result": [rectangle("b") | {"value": {"x": "1"}}]}],
            },
            "rectangle 'b' value.x must be a number",
        ),
    ],
)
def test_a_malformed_task_gets_an_error_naming_the_problem(task, error):
    plan = plan_batch_task(task, CAPTION, PROMPTS, 32, index=3)

    assert plan.request is None
    if error is None:
        assert plan.outcome == empty()  # nothing usable on it: nothing to describe
    else:
        assert plan.outcome["error"].startswith(error)
