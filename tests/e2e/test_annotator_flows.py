"""What an annotator does in Label Studio's editor, with each labeling config, played in headless Chromium
against the real Label Studio and the demo stack; the model's answers are checked where the annotator
looks (the box's fields, the task's answer field) and against the synthetic world's truth.

The flows follow what Label Studio 1.23.2's editor can carry (backend/interactive.py): a box drawn with the
smart tool is answered; region QA asks when the question typed into the box is submitted with Enter;
reasoning asks once the boxes its question names are drawn; nothing a box is not asked about is lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from backend.ls_client import JSON, LabelStudioClient
from devstack.label_studio import LabelStudio
from devstack.provision import (
    ProjectSetup,
    ensure_project,
    ensure_world,
    held_back,
    prelabel,
    world_records,
    world_tasks,
)
from devstack.stack import Stack
from roi_model.synthetic import QUESTION_TEMPLATES, format_caption
from tests.e2e.conftest import ServedModel, require_demo_model, run_annotate, run_start_training

CONFIG_DIR = Path(__file__).resolve().parents[2] / "labeling_configs"
FLOW_TASKS, FLOW_SEED = 16, 21
COLOUR_QUESTION = QUESTION_TEMPLATES["colour"].format(a="<region1>")
LEFT_QUESTION = QUESTION_TEMPLATES["left"].format(a="<region1>", b="<region2>")
# An interactive answer, from Enter or mouse-up to the reply, on a busy 2-core machine (the target is a second).
ANSWER_WITHIN_MS = 5000


@pytest.fixture(scope="module")
def client(stack: Stack) -> LabelStudioClient:
    return stack.client()


@pytest.fixture(scope="module")
def world(label_studio: LabelStudio, served_model: ServedModel) -> Path:
    return ensure_world(
        label_studio.files_root, "world-flows", FLOW_TASKS, FLOW_SEED, held_back(served_model.source)
    )


def bare_tasks(world: Path, question: str | None = None) -> list[JSON]:
    """The world's tasks without boxes, as a team imports photos: the annotator draws the boxes."""
    tasks = []
    for task in world_tasks(world)[:FLOW_TASKS]:
        data = {**task["data"], **({"question": question} if question else {})}
        tasks.append({"data": data})
    return tasks


def flow_project(
    client: LabelStudioClient, stack: Stack, world: Path, config: str, question: str | None = None
) -> ProjectSetup:
    xml = (CONFIG_DIR / f"{config}.xml").read_text()
    images = world / "images"
    return ensure_project(
        client, f"e2e flow: {config}", xml, images, bare_tasks(world, question), stack.backend_url
    )


def record_of(client: LabelStudioClient, setup: ProjectSetup, world: Path, task_id: int) -> JSON:
    [task] = client.get_tasks(setup.project, [task_id])
    return world_records(world)[task["data"]["record_id"]]


def wide_tasks(client: LabelStudioClient, setup: ProjectSetup, world: Path) -> list[tuple[int, JSON]]:
    """Tasks whose image is wide enough to span the canvas, where annotate.js's fractions apply (a tall
    image is shown narrower than the canvas)."""
    records = world_records(world)
    tasks = client.get_tasks(setup.project, setup.task_ids)
    wide = [(t["id"], records[t["data"]["record_id"]]) for t in tasks]
    wide = [(task_id, record) for task_id, record in wide if record["width"] / record["height"] >= 1.3]
    assert len(wide) >= 3, "the flow world has too few wide images"
    return wide


def canvas_box(record: JSON, index: int) -> list[float]:
    x1, y1, x2, y2 = record["regions"][index]
    return [x1 / record["width"], y1 / record["height"], x2 / record["width"], y2 / record["height"]]


def result_of(call: JSON) -> list[JSON] | None:
    return ((call or {}).get("body") or {}).get("data", {}).get("result")


def test_region_qa_answers_the_question_typed_into_a_drawn_box(
    label_studio, stack, client, world, served_model, tmp_path, save_screenshot
):
    setup = flow_project(client, stack, world, "region_qa")
    task_id, record = wide_tasks(client, setup, world)[0]
    shot = tmp_path / "region_qa.png"

    report = run_annotate(
        label_studio,
        setup.project,
        task_id,
        [{"draw": canvas_box(record, 0)}, {"type": COLOUR_QUESTION, "into": "question"}],
        shot,
    )

    drawn, asked = report["steps"]
    assert (
        drawn["call"]["status"] == 200 and result_of(drawn["call"]) is None
    )  # no question yet: the box stays
    assert report["regions_before"] == 0 and len(report["regions"]) == 1, report
    [box] = report["regions"]
    answer = next(item for item in result_of(asked["call"]) if item["from_name"] == "answer")["value"][
        "text"
    ][0]
    assert COLOUR_QUESTION in box["texts"] and answer in box["texts"], (
        report
    )  # question and answer in the box
    assert asked["call"]["ms"] < ANSWER_WITHIN_MS
    assert report["aborted_requests"] == []
    save_screenshot(shot, "region_qa")
    require_demo_model(served_model)
    assert answer == record["objects"][0]["colour"]


def test_reasoning_answers_once_the_boxes_its_question_names_are_drawn(
    label_studio, stack, client, world, served_model, tmp_path, save_screenshot
):
    setup = flow_project(client, stack, world, "multi_region_reasoning", question=LEFT_QUESTION)
    task_id, record = wide_tasks(client, setup, world)[1]
    shot = tmp_path / "multi_region_reasoning.png"

    report = run_annotate(
        label_studio,
        setup.project,
        task_id,
        [{"draw": canvas_box(record, 0)}, {"draw": canvas_box(record, 1)}],
        shot,
        submit=True,
    )

    first, second = report["steps"]
    assert result_of(first["call"]) is None  # the question names region2: nothing yet, the box stays
    answers = [item for item in result_of(second["call"]) if item["from_name"] == "answer"]
    [answer] = [text for item in answers for text in item["value"]["text"]]
    assert answer in report["page_text"].split("\n"), report  # a line of its own: the task's answer field
    context = [item["id"] for item in result_of(second["call"]) if item["type"] == "rectanglelabels"]
    assert len(context) == 2
    assert len(report["regions"]) == 2
    assert second["call"]["ms"] < ANSWER_WITHIN_MS
    # Both boxes are stored where they were drawn: accepting the answer moves or hides neither.
    [annotation] = client.get_tasks(setup.project, [task_id])[0]["annotations"]
    stored = [item["value"] for item in annotation["result"] if item["type"] == "rectanglelabels"]
    drawn = [canvas_box(record, 0), canvas_box(record, 1)]
    assert len(stored) == 2, annotation["result"]
    for value, (x1, y1, x2, y2) in zip(sorted(stored, key=lambda v: v["x"]), sorted(drawn), strict=True):
        assert [value["x"], value["y"], value["width"], value["height"]] == pytest.approx(
            [100 * x1, 100 * y1, 100 * (x2 - x1), 100 * (y2 - y1)], abs=1.0
        ), annotation["result"]
    save_screenshot(shot, "multi_region_reasoning")
    require_demo_model(served_model)
    first_box, second_box = record["regions"][:2]
    assert answer == ("yes" if first_box[0] + first_box[2] < second_box[0] + second_box[2] else "no")


def test_classification_sets_the_drawn_boxs_category(
    label_studio, stack, client, world, served_model, tmp_path, save_screenshot
):
    setup = flow_project(client, stack, world, "region_classification")
    task_id, record = wide_tasks(client, setup, world)[2]
    shot = tmp_path / "region_classification.png"

    report = run_annotate(
        label_studio, setup.project, task_id, [{"draw": canvas_box(record, 0)}], shot, submit=True
    )

    [drawn] = report["steps"]
    assert drawn["call"]["status"] == 200
    assert len(report["regions"]) == 1 and report["submit_status"] in (200, 201), report
    [annotation] = client.get_tasks(setup.project, [task_id])[0]["annotations"]
    boxes = [item for item in annotation["result"] if item["type"] == "rectanglelabels"]
    choices = [item for item in annotation["result"] if item["type"] == "choices"]
    assert len(boxes) == 1 and boxes[0]["value"]["rectanglelabels"] == ["Object"]
    proposed = [item for item in result_of(drawn["call"]) if item["type"] == "choices"]
    assert [c["value"]["choices"] for c in choices] == [p["value"]["choices"] for p in proposed]
    save_screenshot(shot, "region_classification")


def test_a_task_opened_before_is_predicted_once_it_has_boxes(
    label_studio, stack, client, world, served_model, tmp_path
):
    setup = flow_project(client, stack, world, "region_captioning")
    task_id = setup.task_ids[-1]

    # Opening a task without boxes makes Label Studio ask /predict for it: nothing may be stored.
    run_annotate(label_studio, setup.project, task_id, [], tmp_path / "opened.png")
    assert client.get_tasks(setup.project, [task_id])[0]["predictions"] == []

    # The team imports its boxes (an annotation), then retrieves predictions: the task gets them.
    record = record_of(client, setup, world, task_id)
    box = {
        "id": "imported-1",
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": record["width"],
        "original_height": record["height"],
        "value": {
            **dict(zip(("x", "y", "width", "height"), _percent(record, 0), strict=True)),
            "rotation": 0,
            "rectanglelabels": ["Object"],
        },
    }
    client.create_annotation(task_id, [box])
    [task] = prelabel(client, setup.project, served_model.version, task_ids=[task_id], timeout_s=300)
    [prediction] = [p for p in task["predictions"] if p["model_version"] == served_model.version]
    [caption] = [item for item in prediction["result"] if item["type"] == "textarea"]
    require_demo_model(served_model)
    assert caption["value"]["text"] == [format_caption(**record["objects"][0])]


def _percent(record: JSON, index: int) -> list[float]:
    x1, y1, x2, y2 = record["regions"][index]
    width, height = record["width"], record["height"]
    return [x1 / width * 100, y1 / height * 100, (x2 - x1) / width * 100, (y2 - y1) / height * 100]


def test_start_training_with_too_few_annotations_is_refused_with_the_reason(
    label_studio, stack, client, world, tmp_path, save_screenshot
):
    setup = flow_project(client, stack, world, "region_classification")  # one annotation (the test above)
    shot = tmp_path / "start_training.png"

    report = run_start_training(label_studio, setup.project, stack.backend_url, shot)

    assert "Request Sent!" in report["dialog"]  # all Label Studio shows of any reply (README: Start Training)
    status = requests.get(f"{stack.backend_url}/training/{setup.project}", timeout=10).json()
    assert status["status"] == "refused" and status["job"] is None
    assert "a fine-tune needs some to train on and some held out" in status["reason"]
    assert status["reason"] in report["status_page"]  # where the dialog sends the user: the backend's page
    save_screenshot(shot, "start_training")
