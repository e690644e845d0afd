"""The backend through a real Label Studio 1.23.2, with Redis, a worker serving the demo model, and Chromium.

Every project gets synthetic tasks whose true answers are known (roi_model.synthetic: data.jsonl, joined to
the tasks by data.record_id), so the model's captions are checked against the truth. Those checks need the
trained demo model (models/demo); with the tiny stand-in they fail and say so, while every other check runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backend import project_state
from backend.ls_client import JSON, LabelStudioClient
from devstack.label_studio import LabelStudio
from devstack.provision import (
    ProjectSetup,
    drawn_rectangle,
    ensure_project,
    ensure_world,
    held_back,
    prelabel,
    world_records,
    world_tasks,
)
from devstack.stack import Stack
from roi_model.synthetic import QUESTION_TEMPLATES, format_caption
from tests.e2e.conftest import ServedModel, require_demo_model, run_draw_box, run_open_task, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "labeling_configs"
CONFIGS = sorted(path.stem for path in CONFIG_DIR.glob("*.xml"))
CAPTIONS = "region_captioning"
# More tasks than the backend answers inline (8): "Retrieve predictions" goes through the prelabel queue.
CAPTION_TASKS, CAPTION_SEED = 12, 11
CONFIG_TASKS, CONFIG_SEED = 3, 12
REASONING_QUESTION = QUESTION_TEMPLATES["left"].format(a="<region1>", b="<region2>")
TYPED_QUESTION = QUESTION_TEMPLATES["colour"].format(a="<region1>")
_REGION_NUMBER = re.compile(r"r(\d+)$")  # synthetic region ids end in r<K>: the K-th region of the record


def config_xml(name: str) -> str:
    return (CONFIG_DIR / f"{name}.xml").read_text()


def record_of(task: JSON, records: dict[str, JSON]) -> JSON:
    return records[task["data"]["record_id"]]


def true_caption(record: JSON, region_id: str) -> str:
    """The caption of the object a synthetic region id names."""
    number = int(_REGION_NUMBER.search(region_id).group(1))
    return format_caption(**record["objects"][number - 1])


def _aspect(record: JSON) -> float:
    return record["width"] / record["height"]


def _area(box: list[int]) -> int:
    x1, y1, x2, y2 = box
    return (x2 - x1) * (y2 - y1)


def served_prediction(task: JSON, version: str) -> JSON:
    [prediction] = [p for p in task["predictions"] if p["model_version"] == version]
    return prediction


def items(result: list[JSON], **wanted: object) -> list[JSON]:
    return [item for item in result if all(item.get(key) == value for key, value in wanted.items())]


# --- projects ---------------------------------------------------------------------------------------


def tasks_for(config: str, world: Path) -> list[JSON]:
    """The world's tasks, with what a config needs besides the boxes: typed questions, a task question."""
    tasks = world_tasks(world)[:CONFIG_TASKS]
    for task in tasks:
        if config == "region_qa":
            # The question the annotator would have typed into each box's question field.
            boxes = task["predictions"][0]["result"]
            boxes += [
                {
                    "id": box["id"],
                    "from_name": "question",
                    "to_name": "image",
                    "type": "textarea",
                    "value": {"text": [TYPED_QUESTION]},
                }
                for box in list(boxes)
            ]
        elif config == "multi_region_reasoning":
            # The annotator draws the boxes the question names, in its order, and no others.
            prediction = task["predictions"][0]
            prediction["result"] = prediction["result"][:2]
            task["data"]["question"] = REASONING_QUESTION
    return tasks


@pytest.fixture(scope="module")
def client(stack: Stack) -> LabelStudioClient:
    return stack.client()


@pytest.fixture(scope="module")
def caption_world(label_studio: LabelStudio, served_model: ServedModel) -> Path:
    # Without what the model never learned (the demo model: purple; fine-tuning teaches it).
    exclude = held_back(served_model.source)
    return ensure_world(label_studio.files_root, "world-captions", CAPTION_TASKS, CAPTION_SEED, exclude)


@pytest.fixture(scope="module")
def caption_project(stack: Stack, client: LabelStudioClient, caption_world: Path) -> ProjectSetup:
    return ensure_project(
        client,
        "e2e: region captions",
        config_xml(CAPTIONS),
        caption_world / "images",
        world_tasks(caption_world),
        stack.backend_url,
    )


@pytest.fixture(scope="module")
def config_world(label_studio: LabelStudio, served_model: ServedModel) -> Path:
    exclude = held_back(served_model.source)
    return ensure_world(label_studio.files_root, "world-configs", CONFIG_TASKS, CONFIG_SEED, exclude)


def config_project(client: LabelStudioClient, stack: Stack, world: Path, config: str) -> ProjectSetup:
    """The project of one labeling config with the world's first tasks (made once, then found by title)."""
    return ensure_project(
        client,
        f"e2e: {config}",
        config_xml(config),
        world / "images",
        tasks_for(config, world),
        stack.backend_url,
    )


# --- every config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_gets_a_connected_backend_and_predictions(
    config: str, stack: Stack, client: LabelStudioClient, config_world: Path, served_model: ServedModel
) -> None:
    assert client.validate_config(config_xml(config)) == []
    setup = config_project(client, stack, config_world, config)
    backend = client.sdk.ml.get(setup.ml_backend)
    assert (backend.state, backend.is_interactive, backend.url) == ("CO", True, stack.backend_url)
    assert len(setup.task_ids) == CONFIG_TASKS

    tasks = prelabel(client, setup.project, served_model.version, timeout_s=300)

    assert len(tasks) == CONFIG_TASKS
    for task in tasks:
        result = served_prediction(task, served_model.version)["result"]
        box_ids = {
            item["id"] for item in task["predictions"][0]["result"] if item["type"] == "rectanglelabels"
        }
        echoed = {item["id"] for item in items(result, type="rectanglelabels")}
        if config == "region_captioning":
            captions = items(result, from_name="caption", type="textarea")
            assert {item["id"] for item in captions} == box_ids == echoed
            assert all(isinstance(item["value"]["text"][0], str) for item in captions)
        elif config == "region_qa":
            answers = items(result, from_name="answer", type="textarea")
            assert {item["id"] for item in answers} == box_ids == echoed
            assert all(isinstance(item["value"]["text"][0], str) for item in answers)
        elif config == "multi_region_reasoning":
            [answer] = items(result, from_name="answer", type="textarea")
            assert isinstance(answer["value"]["text"][0], str)
            assert echoed == box_ids
        else:
            assert config == "region_classification", f"no check written for {config}"
            # Every box is echoed; one whose answer names no category gets no choices item.
            picked = items(result, from_name="category", type="choices")
            assert echoed == box_ids
            assert {item["id"] for item in picked} <= box_ids
            allowed = {"Person", "Vehicle", "Animal", "Furniture", "Other"}
            assert all(set(item["value"]["choices"]) <= allowed for item in picked)


# --- captions ---------------------------------------------------------------------------------------


def test_interactive_annotating_captions_the_drawn_box(
    client: LabelStudioClient,
    caption_project: ProjectSetup,
    caption_world: Path,
    served_model: ServedModel,
) -> None:
    records = world_records(caption_world)
    tasks = client.get_tasks(caption_project.project, caption_project.task_ids[:3])
    answered, truth = [], []
    for task in tasks:
        record = record_of(task, records)
        drawn = drawn_rectangle(record, 0, f"drawn-{task['id']}")
        reply = client.interactive_annotating(caption_project.ml_backend, task["id"], [drawn])

        assert "errors" not in reply, reply
        result = reply["data"]["result"]
        [box] = items(result, type="rectanglelabels")
        [caption] = items(result, type="textarea", from_name="caption")
        assert box["id"] == caption["id"] == drawn["id"]
        assert box["value"]["x"] == pytest.approx(drawn["value"]["x"])
        assert reply["data"]["model_version"] == served_model.version
        answered.append(caption["value"]["text"][0])
        truth.append(format_caption(**record["objects"][0]))

    require_demo_model(served_model)
    assert answered == truth


def test_retrieve_predictions_gives_every_task_the_true_captions(
    client: LabelStudioClient,
    caption_project: ProjectSetup,
    caption_world: Path,
    served_model: ServedModel,
) -> None:
    records = world_records(caption_world)
    tasks = prelabel(client, caption_project.project, served_model.version, timeout_s=300)

    assert [task["id"] for task in tasks] == caption_project.task_ids
    answered, truth = {}, {}
    for task in tasks:
        record = record_of(task, records)
        captions = items(served_prediction(task, served_model.version)["result"], type="textarea")
        assert len(captions) == len(record["regions"])
        for item in captions:
            answered[item["id"]] = item["value"]["text"][0]
            truth[item["id"]] = true_caption(record, item["id"])
    assert answered.keys() == truth.keys()
    require_demo_model(served_model)
    wrong = {
        region: (answered[region], truth[region]) for region in truth if answered[region] != truth[region]
    }
    assert wrong == {}, f"{len(wrong)} of {len(truth)} captions differ (model, truth)"


# --- webhooks and training --------------------------------------------------------------------------


def test_a_submitted_annotation_moves_the_project_counters(
    stack: Stack, client: LabelStudioClient, caption_project: ProjectSetup, caption_world: Path
) -> None:
    records = world_records(caption_world)
    task = client.get_tasks(caption_project.project, caption_project.task_ids[-1:])[0]
    record = record_of(task, records)
    assert len(record["regions"]) >= 2

    def region(index: int, origin: str, caption: str) -> list[JSON]:
        box = {**drawn_rectangle(record, index, f"a{index}"), "origin": origin}
        text = {
            **box,
            "from_name": "caption",
            "type": "textarea",
            "value": {**box["value"], "text": [caption]},
        }
        del text["value"]["rectanglelabels"]
        return [box, text]

    # As Label Studio saves them: an accepted suggestion, an edited one, a box drawn by hand.
    result = [
        *region(0, "prediction", format_caption(**record["objects"][0])),
        *region(1, "prediction-changed", "a corrected caption"),
    ]
    manual = {**drawn_rectangle(record, 0, "m1"), "origin": "manual"}
    result.append(manual)

    with stack.redis() as connection:
        before = project_state.project_stats(connection, caption_project.project)
        client.create_annotation(task["id"], result)
        expected = {
            **before,
            "annotations_created": before["annotations_created"] + 1,
            "curated": before["curated"] + 1,
        }
        wait_until(
            lambda: project_state.project_stats(connection, caption_project.project) == expected,
            timeout_s=30,
            message="the webhook's counters",
        )


# --- the labeling UI --------------------------------------------------------------------------------


def test_drawing_a_box_in_the_browser_shows_the_true_caption(
    label_studio: LabelStudio,
    stack: Stack,
    client: LabelStudioClient,
    caption_world: Path,
    served_model: ServedModel,
    tmp_path: Path,
    save_screenshot,
) -> None:
    # Tasks without boxes yet: a drag that starts on an existing box would move that box instead of drawing.
    # Wide images: the canvas is as wide as the panel, and only an image that fills that width (instead of
    # being limited by the panel's height) covers the whole canvas, where annotate.js's fractions apply.
    records = world_records(caption_world)
    wide = [t for t in world_tasks(caption_world) if _aspect(records[t["data"]["record_id"]]) >= 1.3]
    unboxed = [{"data": task["data"]} for task in wide[:2]]
    setup = ensure_project(
        client, "e2e: region captions, drawn", config_xml(CAPTIONS), caption_world / "images", unboxed,
        stack.backend_url,
    )  # fmt: skip
    task = client.get_tasks(setup.project, setup.task_ids[:1])[0]
    record = record_of(task, records)
    largest = max(range(len(record["regions"])), key=lambda k: _area(record["regions"][k]))
    x1, y1, x2, y2 = record["regions"][largest]
    box = (x1 / record["width"], y1 / record["height"], x2 / record["width"], y2 / record["height"])

    shot = tmp_path / f"{CAPTIONS}.png"
    report = run_draw_box(label_studio, setup.project, task["id"], box, shot)

    assert report["status"] == 200 and "errors" not in report["body"], report
    assert (report["regions_before"], report["regions_after"]) == (0, 1)
    assert report["aborted_requests"] == []
    [drawn] = items(report["body"]["data"]["result"], type="rectanglelabels")
    # The box drawn on the canvas is the object's box, to within a pixel or two of the screen.
    assert drawn["value"]["x"] == pytest.approx(x1 / record["width"] * 100, abs=1.0)
    assert drawn["value"]["width"] == pytest.approx((x2 - x1) / record["width"] * 100, abs=1.0)
    save_screenshot(shot, CAPTIONS)
    [proposed] = items(report["body"]["data"]["result"], type="textarea")
    assert report["texts"] == proposed["value"]["text"], report  # the box's text field shows the answer
    require_demo_model(served_model)
    assert report["texts"] == [format_caption(**record["objects"][largest])]


@pytest.mark.parametrize("config", [name for name in CONFIGS if name != CAPTIONS])
def test_the_labeling_ui_shows_each_configs_answers(
    config: str,
    label_studio: LabelStudio,
    stack: Stack,
    client: LabelStudioClient,
    config_world: Path,
    served_model: ServedModel,
    tmp_path: Path,
    save_screenshot,
) -> None:
    setup = config_project(client, stack, config_world, config)
    tasks = prelabel(client, setup.project, served_model.version, timeout_s=300)
    task = tasks[0]
    shot = tmp_path / f"{config}.png"
    if config == "region_classification":
        # Its rectangle tool is smart: draw a box the way an annotator does with Auto-Annotation on.
        record = record_of(task, world_records(config_world))
        x1, y1, x2, y2 = record["regions"][0]
        box = (x1 / record["width"], y1 / record["height"], x2 / record["width"], y2 / record["height"])
        report = run_draw_box(label_studio, setup.project, task["id"], box, shot)
        assert report["status"] == 200 and "errors" not in report["body"], report
        # The drawn box stays, with its category when the model's answer names one of the categories
        # (backend.results echoes the box even when it leaves the answer out).
        answer = report["body"]["data"]["result"]
        predicted = {item["id"] for item in served_prediction(task, served_model.version)["result"]}
        [drawn] = [item for item in items(answer, type="rectanglelabels") if item["id"] not in predicted]
        assert report["regions_after"] == report["regions_before"] + 1
        # The task's other boxes go back as they are, so that the editor keeps them.
        assert {item["id"] for item in answer} - predicted == {drawn["id"]}
    else:
        report = run_open_task(label_studio, setup.project, task["id"], shot)
        result = served_prediction(task, served_model.version)["result"]
        # The outliner renders the regions that fit on screen, so it may list fewer than the prediction has.
        assert 1 <= report["regions"] <= len(items(result, type="rectanglelabels"))
        answers = [text for item in items(result, from_name="answer") for text in item["value"]["text"]]
        assert any(answer in report["page_text"] for answer in answers), (answers, report)
    assert report["aborted_requests"] == []
    save_screenshot(shot, config)
