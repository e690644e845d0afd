"""backend.export and backend.dataset: Label Studio's JSON export to training records, and the export around it.

The pure conversion is tested on task dicts shaped like Label Studio 1.23.2's full JSON export (captured
from a real one: a task's "predictions" are ids, every annotation carries the prediction LS recorded for it
in full). The I/O part runs against a stand-in Label Studio on loopback, through the real SDK client, and
through the `roi-model export` command in a subprocess.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image
from standin_label_studio import API_KEY, StandInLabelStudio

from backend.dataset import DATA_FILE, MANIFEST_FILE, REPORT_FILE, export_project, write_dataset
from backend.export import (
    check_report,
    convert_tasks,
    images_needed,
    select_annotations,
    unresolved_parent_predictions,
)
from backend.export_images import StoredImage, export_image
from backend.images import ImageRejected
from backend.labeling import scheme_from_config
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.settings import Settings
from roi_contract.project import Prompts

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "labeling_configs"
CAPTION = scheme_from_config((CONFIGS / "region_captioning.xml").read_text())
REGION_QA = scheme_from_config((CONFIGS / "region_qa.xml").read_text())
REASONING = scheme_from_config((CONFIGS / "multi_region_reasoning.xml").read_text())
CLASSIFICATION = scheme_from_config((CONFIGS / "region_classification.xml").read_text())

PROJECT = 3
URL = "/data/upload/3/scene.jpg"
# As fetched: 800x600. LS's original_width/height below say 640x480 (stale), which must not matter.
IMAGE = StoredImage("images/" + "5f" * 32 + ".jpg", 800, 600)
STALE_SIZE = (640, 480)


# --- task dicts as Label Studio exports them -------------------------------------------------------------


def rectangle(region_id, x, y, width, height, *, origin="manual", rotation=0):
    return {
        "id": region_id,
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": STALE_SIZE[0],
        "original_height": STALE_SIZE[1],
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": rotation,
            "rectanglelabels": ["Object"],
        },
        "origin": origin,
    }


def per_region(region_id, from_name, value, *, origin="manual", item_type="textarea"):
    """A per-region TextArea/Choices item: the shared id ties it to its rectangle (label-studio.md §2.7)."""
    return {
        "id": region_id,
        "from_name": from_name,
        "to_name": "image",
        "type": item_type,
        "original_width": STALE_SIZE[0],
        "original_height": STALE_SIZE[1],
        "image_rotation": 0,
        "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0, **value},
        "origin": origin,
    }


def caption(region_id, text, *, origin="manual"):
    return per_region(region_id, "caption", {"text": [text]}, origin=origin)


def prediction(prediction_id, result, *, model_version="v2", task=17):
    return {
        "id": prediction_id,
        "result": result,
        "model_version": model_version,
        "score": 0.5,
        "created_at": "2026-01-01T09:00:00.000000Z",
        "updated_at": "2026-01-01T09:00:00.000000Z",
        "model": None,
        "model_run": None,
        "task": task,
        "project": PROJECT,
    }


def annotation(
    annotation_id,
    result,
    *,
    completed_by=5,
    updated_at="2026-01-02T10:00:00.000000Z",
    ground_truth=False,
    was_cancelled=False,
    parent_prediction=None,
    viewed=None,
):
    return {
        "id": annotation_id,
        "completed_by": completed_by,
        "result": result,
        "was_cancelled": was_cancelled,
        "ground_truth": ground_truth,
        "created_at": "2026-01-02T09:59:00.000000Z",
        "updated_at": updated_at,
        "draft_created_at": None,
        "lead_time": 12.5,
        "prediction": viewed or {},
        "result_count": len(result),
        "task": 17,
        "project": PROJECT,
        "parent_prediction": parent_prediction,
        "parent_annotation": None,
    }


def task(task_id, annotations, *, predictions=(), data=None, drafts=()):
    return {
        "id": task_id,
        "annotations": annotations,
        "drafts": list(drafts),
        "predictions": list(predictions),
        "data": data if data is not None else {"image": URL},
        "meta": {},
        "project": PROJECT,
    }


DEFAULT_PROMPTS = Prompts()


def convert(tasks, scheme=CAPTION, prompts=DEFAULT_PROMPTS, images=None):
    conversion = convert_tasks(
        tasks, scheme, prompts, PROJECT, images if images is not None else {URL: IMAGE}
    )
    check_report(conversion.report)
    return conversion


SUGGESTED = prediction(
    5,
    [
        rectangle("r1", 10, 20, 35, 40),
        caption("r1", "a large red square"),
        caption("r2", "a small blue circle"),
    ],
)


def curated_task():
    """Task 17: one annotation with an edited, an accepted and a hand-made caption, and a box without one."""
    return task(
        17,
        [
            annotation(
                42,
                [
                    rectangle("r1", 10, 20, 35, 40, origin="prediction"),
                    caption("r1", "a large red circle", origin="prediction-changed"),
                    rectangle("r2", 50, 50, 25, 25, origin="prediction"),
                    caption("r2", "a small blue circle", origin="prediction"),
                    rectangle("r3", 0, 0, 10, 10),
                    caption("r3", "  a green\t", origin="manual"),
                    rectangle("r4", 70, 70, 10, 10),
                ],
                parent_prediction=5,
                viewed=SUGGESTED,
            )
        ],
        predictions=[5],  # the export lists a task's predictions by id
    )


# --- records -------------------------------------------------------------------------------------------


def test_a_caption_annotation_becomes_one_record_with_a_turn_per_captioned_region():
    conversion = convert([curated_task()])

    assert conversion.records == [
        {
            "id": "ls:3:17:42",
            "image": IMAGE.path,
            "width": 800,
            "height": 600,
            "regions": [[80, 120, 360, 360], [400, 300, 600, 450], [0, 0, 80, 60]],
            "conversations": [
                {"from": "human", "value": "Describe <region1> briefly.", "kind": "caption"},
                {
                    "from": "gpt",
                    "value": "a large red circle",
                    "source": {
                        "region": "r1",
                        "origin": "prediction-changed",
                        "suggestion": "a large red square",
                    },
                },
                {"from": "human", "value": "Describe <region2> briefly.", "kind": "caption"},
                {
                    "from": "gpt",
                    "value": "a small blue circle",
                    "source": {"region": "r2", "origin": "prediction", "suggestion": None},
                },
                {"from": "human", "value": "Describe <region3> briefly.", "kind": "caption"},
                {
                    "from": "gpt",
                    "value": "a green",
                    "source": {"region": "r3", "origin": "manual", "suggestion": None},
                },
            ],
            "source": {
                "project": 3,
                "task": 17,
                "annotation": 42,
                "updated_at": "2026-01-02T10:00:00.000000Z",
                "annotator": 5,
                "ground_truth": False,
                "origin": "mixed",
                "model_version": "v2",
                "suggestion": None,
                "region_ids": ["r1", "r2", "r3"],
            },
        }
    ]
    assert conversion.report == {
        "project": 3,
        "kind": "caption",
        "annotations_total": 1,
        "annotations_exported": 1,
        "annotations_skipped": {},
        "regions_total": 4,
        "regions_exported": 3,
        "regions_skipped": {"no_text": ["42:r4"]},
        "answers": 3,
        "by_origin": {"prediction": 1, "prediction-changed": 1, "manual": 1},
        "records": 1,
        "images": 1,
        "image_errors": {},
    }


def test_the_projects_caption_prompt_is_asked_about_each_region_by_its_number():
    prompts = Prompts(caption="What is in <region1>? One line.")
    conversion = convert([curated_task()], prompts=prompts)
    questions = [turn["value"] for turn in conversion.records[0]["conversations"] if turn["from"] == "human"]
    assert questions == [
        "What is in <region1>? One line.",
        "What is in <region2>? One line.",
        "What is in <region3>? One line.",
    ]


def test_a_single_answer_record_carries_its_origin_and_suggestion_in_the_record_source():
    edited = task(
        17,
        [
            annotation(
                42,
                [
                    rectangle("r1", 10, 20, 35, 40, origin="prediction"),
                    caption("r1", "a red circle", origin="prediction-changed"),
                ],
                parent_prediction=5,
                viewed=SUGGESTED,
            )
        ],
        predictions=[5],
    )
    source = convert([edited]).records[0]["source"]
    assert (source["origin"], source["suggestion"], source["model_version"]) == (
        "prediction-changed",
        "a large red square",
        "v2",
    )


def test_the_origin_falls_back_to_the_rectangles_and_is_unknown_without_either():
    imported_caption = caption("r1", "a red circle")
    del imported_caption["origin"]
    no_origin_box = rectangle("r2", 50, 50, 10, 10)
    del no_origin_box["origin"]
    no_origin_text = caption("r2", "a blue square")
    del no_origin_text["origin"]
    tasks = [
        task(
            17,
            [
                annotation(
                    42,
                    [
                        rectangle("r1", 10, 20, 35, 40, origin="prediction"),
                        imported_caption,
                        no_origin_box,
                        no_origin_text,
                    ],
                )
            ],
        )
    ]
    conversion = convert(tasks)
    origins = [
        turn["source"]["origin"] for turn in conversion.records[0]["conversations"] if turn["from"] == "gpt"
    ]
    assert origins == ["prediction", "unknown"]
    assert conversion.report["by_origin"] == {
        "prediction": 1,
        "prediction-changed": 0,
        "manual": 0,
        "unknown": 1,
    }


def test_the_suggestion_comes_from_the_parent_prediction_not_from_the_one_viewed():
    older = prediction(4, [caption("r1", "an old guess")], model_version="v1")
    # A full export (a snapshot) lists the task's predictions in full; the parent is prediction 5.
    edited = task(
        17,
        [
            annotation(
                42,
                [rectangle("r1", 10, 20, 35, 40), caption("r1", "a red circle", origin="prediction-changed")],
                parent_prediction=5,
                viewed=older,
            )
        ],
        predictions=[older, SUGGESTED],
    )
    source = convert([edited]).records[0]["source"]
    assert (source["suggestion"], source["model_version"]) == ("a large red square", "v2")


def test_without_a_parent_the_viewed_prediction_is_the_source_only_for_items_from_a_prediction():
    def exported(origin):
        items = [rectangle("r1", 10, 20, 35, 40, origin=origin), caption("r1", "a red circle", origin=origin)]
        return task(17, [annotation(42, items, viewed=SUGGESTED)], predictions=[5])

    changed = convert([exported("prediction-changed")]).records[0]["source"]
    assert (changed["suggestion"], changed["model_version"]) == ("a large red square", "v2")
    manual = convert([exported("manual")]).records[0]["source"]
    assert (manual["suggestion"], manual["model_version"]) == (None, None)


def test_an_unresolvable_parent_prediction_leaves_suggestion_and_model_version_empty():
    edited = task(
        17,
        [
            annotation(
                42,
                [rectangle("r1", 10, 20, 35, 40), caption("r1", "x", origin="prediction-changed")],
                parent_prediction=9,
            )
        ],
        predictions=[9],
    )
    assert unresolved_parent_predictions(edited) == {9}
    assert unresolved_parent_predictions(curated_task()) == set()
    source = convert([edited]).records[0]["source"]
    assert (source["suggestion"], source["model_version"]) == (None, None)


def test_boxes_are_pixels_of_the_fetched_image_and_rotated_ones_their_bounding_box():
    result = [
        # 160x60 px at (400, 60), turned 90° clockwise around its top-left corner: x 340..400, y 60..220.
        rectangle("r1", 50, 10, 20, 10, rotation=90),
        caption("r1", "a tilted bar"),
        rectangle("r2", 95, 90, 20, 20),  # reaches past the image: clipped
        caption("r2", "a corner"),
    ]
    conversion = convert([task(17, [annotation(42, result)])])
    assert conversion.records[0]["regions"] == [[340, 60, 400, 220], [760, 540, 800, 600]]

    # The same percentages on an image fetched portrait while LS says 640x480: the unrotated box follows
    # the image (percentages are exact), the rotated one would change shape with the aspect ratio, so it is
    # counted under its reason instead of becoming a wrong box.
    portrait = StoredImage(IMAGE.path, 600, 800)
    rotated = convert([task(17, [annotation(42, result)])], images={URL: portrait})
    assert rotated.records[0]["regions"] == [[570, 720, 600, 800]]
    assert (rotated.records[0]["width"], rotated.records[0]["height"]) == (600, 800)
    assert rotated.report["regions_skipped"] == {"rotated_box_aspect_mismatch": ["42:r1"]}

    # With LS's size agreeing with the fetched image (what LS records for an EXIF-rotated photo), the
    # rotated box is turned in the image's own pixels: 120x80 px at (300, 80) covers x 220..300, y 80..200.
    agreeing = [{**item, "original_width": 600, "original_height": 800} for item in result]
    upright = convert([task(17, [annotation(42, agreeing)])], images={URL: portrait})
    assert upright.records[0]["regions"] == [[220, 80, 300, 200], [570, 720, 600, 800]]


def test_unusable_boxes_are_left_out_with_their_reason():
    broken = rectangle("r2", 10, 10, 10, 10)
    del broken["value"]["width"]
    result = [
        rectangle("r1", 10, 20, 35, 40),
        caption("r1", "kept"),
        broken,
        caption("r2", "no geometry"),
        rectangle("r3", 10, 10, 0.01, 10),  # less than a pixel wide
        caption("r3", "too thin"),
        rectangle("r1", 60, 60, 10, 10),  # the same id again: its caption would be ambiguous
        rectangle("r4", float("nan"), 10, 10, 10),
        caption("r4", "nowhere"),
        {key: value for key, value in rectangle("r5", 10, 10, 10, 10).items() if key != "id"},
    ]
    conversion = convert([task(17, [annotation(42, result)])])
    assert conversion.records[0]["source"]["region_ids"] == ["r1"]
    assert conversion.report["regions_skipped"] == {
        "invalid_box": ["42:r2", "42:r4"],
        "empty_box": ["42:r3"],
        "duplicate_region_id": ["42:r1#2"],
        "no_region_id": ["42:None"],
    }

    # Listed once each, also when their whole annotation is left out.
    skipped = convert([task(17, [annotation(43, result, was_cancelled=True)])]).report
    assert skipped["regions_skipped"] == {
        "annotation_cancelled": ["43:r1", "43:r2", "43:r3", "43:r1#2", "43:r4", "43:None"]
    }


def test_regions_without_text_are_left_out_and_an_annotation_without_any_too():
    result = [
        rectangle("r1", 10, 20, 35, 40),
        rectangle("r2", 50, 50, 10, 10),
        per_region("r2", "caption", {"text": []}),
        rectangle("r3", 60, 60, 10, 10),
        caption("r3", "   "),
        caption("r9", "a caption whose box is gone"),
    ]
    conversion = convert([task(17, [annotation(42, result)])])
    assert conversion.records == []
    assert conversion.report["annotations_skipped"] == {"no_answered_regions": [42]}
    assert conversion.report["regions_skipped"] == {"no_text": ["42:r1", "42:r2", "42:r3"]}


# --- which annotations ---------------------------------------------------------------------------------


def test_cancelled_empty_and_boxless_annotations_are_left_out_and_drafts_never_read():
    answered = [rectangle("r1", 10, 20, 35, 40), caption("r1", "a red circle")]
    skipped_with_a_box = annotation(44, answered, was_cancelled=True)
    tasks = [
        task(
            17,
            [
                annotation(43, [], was_cancelled=True),
                skipped_with_a_box,
                annotation(45, []),
                annotation(46, [per_region("x", "caption", {"text": ["text, no box"]})]),
                annotation(47, answered),
            ],
            drafts=[{"id": 1, "result": answered, "user": 5}],
        ),
        task(18, [], drafts=[{"id": 2, "result": answered, "user": 5}]),
    ]
    conversion = convert(tasks)
    assert [record["id"] for record in conversion.records] == ["ls:3:17:47"]
    report = conversion.report
    assert report["annotations_total"] == 5
    assert report["annotations_skipped"] == {"cancelled": [43, 44], "empty": [45], "no_rectangles": [46]}
    assert report["regions_skipped"] == {"annotation_cancelled": ["44:r1"]}
    assert (report["regions_total"], report["regions_exported"]) == (2, 1)


def test_with_several_annotators_each_annotation_is_its_own_record():
    tasks = [
        task(
            17,
            [
                annotation(
                    51, [rectangle("r1", 10, 20, 35, 40), caption("r1", "a red circle")], completed_by=6
                ),
                annotation(
                    50,
                    [rectangle("r1", 10, 20, 35, 40), caption("r1", "a red disc")],
                    completed_by={"id": 5, "email": "a@b.c"},
                ),
            ],
        )
    ]
    records = convert(tasks).records
    assert [(r["id"], r["source"]["annotator"], r["conversations"][1]["value"]) for r in records] == [
        ("ls:3:17:50", 5, "a red disc"),
        ("ls:3:17:51", 6, "a red circle"),
    ]


def test_a_ground_truth_annotation_wins_over_the_others_the_newest_if_several():
    def answered(annotation_id, text, **fields):
        return annotation(annotation_id, [rectangle("r1", 10, 20, 35, 40), caption("r1", text)], **fields)

    tasks = [
        task(
            17,
            [
                answered(60, "first"),
                answered(61, "ground truth, newer", ground_truth=True, updated_at="2026-01-03T10:00:00Z"),
                answered(62, "ground truth, older", ground_truth=True, updated_at="2026-01-02T10:00:00Z"),
                annotation(63, [], was_cancelled=True, ground_truth=True),
                answered(64, "ground truth, no time", ground_truth=True, updated_at=None),  # oldest of all
            ],
        )
    ]
    conversion = convert(tasks)
    # The newest by time, not by id.
    assert [(r["id"], r["source"]["ground_truth"]) for r in conversion.records] == [("ls:3:17:61", True)]
    assert conversion.report["annotations_skipped"] == {
        "cancelled": [63],
        "superseded_by_ground_truth": [60, 62, 64],
    }
    assert conversion.report["regions_skipped"] == {
        "annotation_superseded_by_ground_truth": ["60:r1", "62:r1", "64:r1"]
    }


# --- the other kinds -----------------------------------------------------------------------------------


def test_region_qa_asks_each_region_the_question_typed_for_it():
    def question(region_id, text):
        return per_region(region_id, "question", {"text": [text]})

    def answer(region_id, text, origin="manual"):
        return per_region(region_id, "answer", {"text": [text]}, origin=origin)

    result = [
        rectangle("r1", 10, 20, 35, 40),
        question("r1", "What colour is <region1>?"),
        answer("r1", "red", origin="prediction"),
        rectangle("r2", 50, 50, 10, 10),
        question("r2", "is it round?"),
        answer("r2", "yes"),
        rectangle("r3", 60, 60, 10, 10),
        question("r3", "Is <region1> left of <region2>?"),
        answer("r3", "no"),
        rectangle("r4", 70, 70, 10, 10),
        answer("r4", "an answer to nothing"),
        rectangle("r5", 80, 80, 10, 10),
        question("r5", "unanswered?"),
    ]
    conversion = convert([task(17, [annotation(42, result)])], scheme=REGION_QA)
    record = conversion.records[0]
    assert [(turn["value"], turn.get("kind")) for turn in record["conversations"]] == [
        ("What colour is <region1>?", "region_qa"),
        ("red", None),
        ("<region2>: is it round?", "region_qa"),
        ("yes", None),
    ]
    assert record["source"]["region_ids"] == ["r1", "r2"]
    assert conversion.report["regions_skipped"] == {
        "question_refers_to_other_region": ["42:r3"],
        "no_question": ["42:r4"],
        "no_text": ["42:r5"],
    }


def test_classification_answers_with_the_chosen_choice():
    def chosen(region_id, choices, origin="manual"):
        return per_region(region_id, "category", {"choices": choices}, origin=origin, item_type="choices")

    suggested = prediction(5, [rectangle("r1", 10, 20, 35, 40), chosen("r1", ["Animal"])])
    result = [
        rectangle("r1", 10, 20, 35, 40, origin="prediction"),
        chosen("r1", ["Person"], origin="prediction-changed"),
        rectangle("r2", 50, 50, 10, 10),
        chosen("r2", ["Person", "Animal"]),
        rectangle("r3", 60, 60, 10, 10),
        chosen("r3", ["Spaceship"]),
        rectangle("r4", 70, 70, 10, 10),
        chosen("r4", []),
    ]
    tasks = [task(17, [annotation(42, result, parent_prediction=5, viewed=suggested)], predictions=[5])]
    conversion = convert(tasks, scheme=CLASSIFICATION)
    assert conversion.records[0]["conversations"] == [
        {
            "from": "human",
            "value": "What is <region1>? Answer with one of: Person, Vehicle, Animal, Furniture, Other.",
            "kind": "classification",
        },
        {
            "from": "gpt",
            "value": "Person",
            "source": {"region": "r1", "origin": "prediction-changed", "suggestion": "Animal"},
        },
    ]
    assert conversion.report["regions_skipped"] == {
        "several_choices": ["42:r2"],
        "choice_not_in_config": ["42:r3"],
        "no_choice": ["42:r4"],
    }


def reasoning_answer(text, origin="manual"):
    return {
        "id": "a1",
        "from_name": "answer",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": [text]},
        "origin": origin,
    }


def test_reasoning_asks_the_tasks_question_over_all_rectangles_in_result_order():
    question = "Is <region2> larger than <region1>?"
    suggested = prediction(5, [reasoning_answer("no")])
    result = [
        rectangle("b", 50, 50, 25, 25),
        rectangle("a", 10, 20, 35, 40),
        reasoning_answer("yes", origin="prediction-changed"),
    ]
    tasks = [
        task(
            17,
            [annotation(42, result, parent_prediction=5, viewed=suggested)],
            predictions=[5],
            data={"image": URL, "question": question},
        )
    ]
    conversion = convert(tasks, scheme=REASONING)
    record = conversion.records[0]
    assert record["regions"] == [[400, 300, 600, 450], [80, 120, 360, 360]]
    assert record["conversations"] == [
        {"from": "human", "value": question, "kind": "reasoning"},
        {
            "from": "gpt",
            "value": "yes",
            "source": {"region": None, "origin": "prediction-changed", "suggestion": "no"},
        },
    ]
    assert record["source"]["region_ids"] == ["b", "a"]
    assert (conversion.report["regions_exported"], conversion.report["answers"]) == (2, 1)


def test_reasoning_annotations_that_cannot_make_a_record_are_left_out_with_their_regions():
    two_boxes = [rectangle("a", 10, 20, 35, 40), rectangle("b", 50, 50, 25, 25)]
    broken = rectangle("c", 10, 10, 10, 10)
    del broken["value"]["x"]
    tasks = [
        task(
            17,
            [annotation(71, [*two_boxes, reasoning_answer("yes")])],
            data={"image": URL, "question": "Is <region3> red?"},
        ),
        task(18, [annotation(72, [*two_boxes, reasoning_answer("yes")])], data={"image": URL}),
        task(19, [annotation(73, two_boxes)], data={"image": URL, "question": "Is <region1> red?"}),
        task(
            20,
            [annotation(74, [*two_boxes, broken, reasoning_answer("no")])],
            data={"image": URL, "question": "Red?"},
        ),
    ]
    conversion = convert(tasks, scheme=REASONING)
    assert conversion.records == []
    assert conversion.report["annotations_skipped"] == {
        "question_refers_to_missing_region": [71],
        "no_question": [72],
        "no_answer": [73],
        "unusable_box": [74],
    }
    assert conversion.report["regions_skipped"]["annotation_unusable_box"] == ["74:a", "74:b", "74:c"]


# --- images --------------------------------------------------------------------------------------------


def test_only_tasks_with_an_annotation_to_export_need_their_image():
    answered = [rectangle("r1", 10, 20, 35, 40), caption("r1", "a red circle")]
    tasks = [
        task(19, [annotation(3, answered)], data={"image": "/data/upload/3/b.png"}),
        task(17, [annotation(1, answered)]),
        task(18, [annotation(2, answered)]),  # the same image as task 17
        task(20, [annotation(4, [], was_cancelled=True)], data={"image": "/data/upload/3/skipped.png"}),
        task(21, [annotation(5, answered)], data={"text": "no image"}),
    ]
    assert images_needed(tasks, CAPTION) == {URL: 17, "/data/upload/3/b.png": 19}


def test_annotations_whose_image_is_missing_or_unavailable_are_left_out():
    answered = [rectangle("r1", 10, 20, 35, 40), caption("r1", "a red circle")]
    refusal = "image /data/upload/3/b.png: HTTP 404 from http://ls/data/upload/3/b.png"
    tasks = [
        task(17, [annotation(1, answered)]),
        task(19, [annotation(3, answered)], data={"image": "/data/upload/3/b.png"}),
        task(21, [annotation(5, answered)], data={"image": ""}),
    ]
    conversion = convert(tasks, images={URL: IMAGE, "/data/upload/3/b.png": refusal})
    assert [record["id"] for record in conversion.records] == ["ls:3:17:1"]
    assert conversion.report["annotations_skipped"] == {"image_unavailable": [3], "no_image": [5]}
    assert conversion.report["image_errors"] == {"/data/upload/3/b.png": refusal}
    with pytest.raises(
        ValueError, match=re.escape("no image and no failure given for '/data/upload/3/b.png'")
    ):
        convert_tasks(tasks, CAPTION, Prompts(), PROJECT, {URL: IMAGE})


# --- the report and determinism -------------------------------------------------------------------------


def mixed_tasks():
    answered = [rectangle("r1", 10, 20, 35, 40), caption("r1", "a red circle"), rectangle("r2", 1, 1, 5, 5)]
    return [
        curated_task(),
        task(18, [annotation(81, answered, ground_truth=True), annotation(80, answered)]),
        task(19, [annotation(83, [], was_cancelled=True), annotation(82, answered, completed_by=7)]),
        task(20, [annotation(84, [rectangle("r1", 1, 1, 5, 5)])]),
    ]


def test_the_report_accounts_for_every_annotation_and_region_once():
    report = convert(mixed_tasks()).report
    skipped_annotations = [ref for refs in report["annotations_skipped"].values() for ref in refs]
    skipped_regions = [ref for refs in report["regions_skipped"].values() for ref in refs]
    assert report["annotations_exported"] + len(skipped_annotations) == report["annotations_total"] == 6
    assert report["regions_exported"] + len(skipped_regions) == report["regions_total"] == 11
    assert (report["records"], report["answers"], sum(report["by_origin"].values())) == (3, 5, 5)


def test_a_report_that_does_not_add_up_is_refused():
    report = convert(mixed_tasks()).report
    lost = {**report, "regions_skipped": {**report["regions_skipped"], "no_text": []}}
    with pytest.raises(AssertionError, match="regions exported"):
        check_report(lost)
    twice = {**report, "annotations_skipped": {**report["annotations_skipped"], "again": [83]}}
    with pytest.raises(AssertionError, match="two reasons"):
        check_report(twice)
    uncounted = {**report, "by_origin": {**report["by_origin"], "manual": report["by_origin"]["manual"] + 1}}
    with pytest.raises(AssertionError) as refusal:
        check_report(uncounted)
    assert str(refusal.value) == (
        f"export report: by_origin {uncounted['by_origin']} does not add up to {report['answers']}"
    )
    with pytest.raises(AssertionError) as refusal:
        check_report({**report, "records": report["records"] + 1})
    assert str(refusal.value) == "export report: records and exported annotations differ"


def test_the_output_does_not_depend_on_the_order_of_the_export(tmp_path):
    tasks = mixed_tasks()
    shuffled = [{**t, "annotations": list(reversed(t["annotations"]))} for t in tasks]
    random.Random(7).shuffle(shuffled)
    first, second = convert(tasks), convert(shuffled)
    assert first == second

    write_dataset(tmp_path / "a", first, {"project": PROJECT})
    write_dataset(tmp_path / "b", second, {"project": PROJECT})
    for name in (DATA_FILE, REPORT_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    manifest = json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())
    assert manifest["files"] == {
        name: hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest()
        for name in (DATA_FILE, REPORT_FILE)
    }
    lines = (tmp_path / "a" / DATA_FILE).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["ls:3:17:42", "ls:3:18:81", "ls:3:19:82"]


def test_records_are_what_training_reads(tmp_path):
    from roi_model.training import question_rows, read_records

    write_dataset(tmp_path, convert([curated_task()]), {"project": PROJECT})
    [record] = read_records([tmp_path / DATA_FILE])
    rows = question_rows(record, split=True)
    assert [(turns[0][1], regions, kind) for turns, regions, kind in rows] == [
        ("Describe <region1> briefly.", [0], "caption"),
        ("Describe <region1> briefly.", [1], "caption"),
        ("Describe <region1> briefly.", [2], "caption"),
    ]


def test_an_export_that_is_not_a_task_list_is_a_clear_error():
    with pytest.raises(ValueError, match="must be a list of tasks"):
        convert_tasks({"id": 1}, CAPTION, Prompts(), PROJECT, {})
    with pytest.raises(ValueError, match="export entry 0 is not a task with an integer 'id'"):
        convert_tasks([{"data": {}}], CAPTION, Prompts(), PROJECT, {})
    with pytest.raises(ValueError, match="annotation 42: 'result' is not a list"):
        convert_tasks([task(17, [{"id": 42, "result": None}])], CAPTION, Prompts(), PROJECT, {})
    assert select_annotations(task(17, []), CAPTION) == ([], [])


# --- the I/O part, against a stand-in Label Studio on loopback -----------------------------------------


def jpeg_shown_portrait() -> bytes:
    """80x60 pixels stored, EXIF orientation 6: displayed as 60x80."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def png(size=(40, 30), noise=False) -> bytes:
    buffer = io.BytesIO()
    if noise:  # incompressible: the file is as large as the pixels
        image = Image.frombytes("RGB", size, random.Random(1).randbytes(size[0] * size[1] * 3))
    else:
        image = Image.new("RGB", size, (30, 200, 30))
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def label_studio() -> Iterator[StandInLabelStudio]:
    server = StandInLabelStudio()
    portrait_url = "/data/local-files/?d=images/portrait.jpg"
    exported = [
        task(
            17,
            [
                annotation(
                    42,
                    [
                        rectangle("r1", 10, 20, 50, 25),
                        caption("r1", "a red bar", origin="prediction-changed"),
                    ],
                    parent_prediction=5,
                )
            ],
            predictions=[5],
            data={"image": portrait_url},
        ),
        task(
            18,
            [annotation(43, [rectangle("r1", 0, 0, 50, 50), caption("r1", "a green square")])],
            data={"image": "/data/upload/3/green.png"},
        ),
        task(
            19,
            [annotation(44, [rectangle("r1", 0, 0, 50, 50), caption("r1", "too big")])],
            data={"image": "/data/upload/3/big.png"},
        ),
        task(
            20,
            [annotation(45, [rectangle("r1", 0, 0, 50, 50), caption("r1", "elsewhere")])],
            data={"image": "http://192.0.2.1/x.png"},
        ),
        task(
            21,
            [annotation(46, [rectangle("r1", 0, 0, 50, 50), caption("r1", "the same picture")])],
            data={"image": "/data/upload/3/green-again.png"},
        ),
    ]
    server.serve(
        f"/api/projects/{PROJECT}/",
        {"id": PROJECT, "title": "captions", "label_config": (CONFIGS / "region_captioning.xml").read_text()},
    )
    server.serve(f"/api/projects/{PROJECT}/export", exported)
    server.serve("/api/predictions/", [prediction(5, [caption("r1", "a red square")], task=17)])
    server.serve("/data/local-files/", jpeg_shown_portrait())
    server.serve("/data/upload/3/green.png", png())
    server.serve("/data/upload/3/green-again.png", png())
    server.serve("/data/upload/3/big.png", png((64, 64), noise=True))
    yield server
    server.close()


def settings_for(server: StandInLabelStudio, **overrides) -> Settings:
    return Settings(
        label_studio_url=server.url, label_studio_api_key=API_KEY, image_max_bytes=2000, **overrides
    )


def test_export_project_writes_records_images_report_and_manifest(label_studio, tmp_path):
    client = LabelStudioClient(label_studio.url, API_KEY)
    (tmp_path / "out" / "images").mkdir(parents=True)
    stale = tmp_path / "out" / "images" / ("0" * 64 + ".png")
    stale.write_bytes(b"from an earlier export")
    keep = tmp_path / "out" / "images" / "README.txt"
    keep.write_text("not ours")

    report = export_project(client, PROJECT, tmp_path / "out", settings_for(label_studio))

    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / DATA_FILE).read_text().splitlines()]
    portrait_name = f"images/{hashlib.sha256(jpeg_shown_portrait()).hexdigest()}.jpg"
    green_name = f"images/{hashlib.sha256(png()).hexdigest()}.png"
    assert [(r["id"], r["image"], r["width"], r["height"], r["regions"]) for r in records] == [
        ("ls:3:17:42", portrait_name, 60, 80, [[6, 16, 36, 36]]),
        ("ls:3:18:43", green_name, 40, 30, [[0, 0, 20, 15]]),
        ("ls:3:21:46", green_name, 40, 30, [[0, 0, 20, 15]]),
    ]
    # The export listed prediction 5 by id only: it was fetched for the suggestion.
    assert records[0]["conversations"][1]["source"]["suggestion"] == "a red square"
    assert (out / portrait_name).read_bytes() == jpeg_shown_portrait()  # the original bytes, EXIF and all
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        [Path(portrait_name).name, Path(green_name).name, "README.txt"]
    )
    assert report == json.loads((out / REPORT_FILE).read_text())
    assert report["annotations_skipped"] == {"image_unavailable": [44, 45]}
    assert "ROI_IMAGE_MAX_BYTES=2000" in report["image_errors"]["/data/upload/3/big.png"]
    assert (
        "host '192.0.2.1' is not in ROI_IMAGE_ALLOWED_HOSTS"
        in report["image_errors"]["http://192.0.2.1/x.png"]
    )
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["files"][DATA_FILE] == hashlib.sha256((out / DATA_FILE).read_bytes()).hexdigest()
    assert (manifest["project"], manifest["kind"], manifest["records"], manifest["images"]) == (
        3,
        "caption",
        3,
        2,
    )
    assert all(authorization == f"Token {API_KEY}" for _, authorization in label_studio.requests)

    # The same export again, into another folder: byte for byte the same.
    export_project(client, PROJECT, tmp_path / "again", settings_for(label_studio))
    for name in (DATA_FILE, REPORT_FILE, portrait_name, green_name):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_the_key_goes_to_label_studio_only_and_redirects_are_checked(label_studio, tmp_path):
    def export(url: str, **overrides) -> StoredImage:
        settings = settings_for(label_studio, **overrides)
        return export_image(url, task_id=17, settings=settings, out_dir=tmp_path)

    image_host = StandInLabelStudio()  # a second server, playing an allowed image host
    try:
        image_host.serve("/open/a.png", png())
        label_studio.routes["/tasks/17/presign/"] = lambda request: (
            303,
            {"Location": f"{image_host.url}/open/a.png"},
            b"",
        )
        host = f"127.0.0.1:{urlsplit(image_host.url).port}"

        stored = export("s3://bucket/a.png", image_allowed_hosts=(host,))
        assert (stored.width, stored.height) == (40, 30)
        assert image_host.requests == [("/open/a.png", None)]

        with pytest.raises(
            ImageRejected, match=re.escape("host '127.0.0.1' is not in ROI_IMAGE_ALLOWED_HOSTS")
        ):
            export("s3://bucket/a.png")
        with pytest.raises(ImageRejected, match="local files are disabled"):
            export("/etc/passwd")
        with pytest.raises(ImageRejected, match="HTTP 404"):
            export("/data/upload/3/missing.png")
        label_studio.serve("/data/upload/3/page.html", b"<html>login</html>")
        with pytest.raises(ImageRejected, match="not an image in a supported format"):
            export("/data/upload/3/page.html")
        with pytest.raises(ImageRejected, match="more than ROI_IMAGE_MAX_PIXELS=100"):
            export("/data/upload/3/green.png", image_max_pixels=100)
        assert image_host.requests == [("/open/a.png", None)]
    finally:
        image_host.close()


def test_label_studio_refusing_the_export_is_a_clear_error(label_studio, tmp_path):
    client = LabelStudioClient(label_studio.url, API_KEY)
    with pytest.raises(LabelStudioError, match="HTTP 404"):
        export_project(client, 99, tmp_path, settings_for(label_studio))
    assert not (tmp_path / DATA_FILE).exists()


def run_cli(server: StandInLabelStudio, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": server.url,
        "LABEL_STUDIO_API_KEY": API_KEY,
        "ROI_IMAGE_MAX_BYTES": "2000",
    }
    return subprocess.run(
        [sys.executable, "-m", "roi_model.cli", "export", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_roi_model_export_prints_the_report_it_writes(label_studio, tmp_path):
    prompts = json.dumps({"prompts": {"caption": "Name <region1>."}})
    done = run_cli(label_studio, "--project", str(PROJECT), "--out", str(tmp_path), "--extra-params", prompts)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert json.loads(line) == json.loads((tmp_path / REPORT_FILE).read_text())
    first = json.loads((tmp_path / DATA_FILE).read_text().splitlines()[0])
    assert first["conversations"][0]["value"] == "Name <region1>."

    refused = run_cli(label_studio, "--project", "99", "--out", str(tmp_path / "none"))
    assert refused.returncode == 1
    assert "roi-model export: Label Studio get project 99: HTTP 404" in refused.stderr


def test_roi_model_export_converts_a_saved_export_file_and_refuses_json_min_by_name(label_studio, tmp_path):
    saved = tmp_path / "export.json"
    saved.write_text(json.dumps([{**curated_task(), "data": {"image": "/data/upload/3/green.png"}}]))
    done = run_cli(
        label_studio, "--project", str(PROJECT), "--out", str(tmp_path / "a"), "--export-file", str(saved)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["records"] == 1

    json_min = tmp_path / "min.json"
    json_min.write_text(
        json.dumps([{"id": 17, "image": URL, "caption": ["a red circle"], "annotation_id": 42}])
    )
    refused = run_cli(
        label_studio, "--project", str(PROJECT), "--out", str(tmp_path / "b"), "--export-file", str(json_min)
    )
    assert refused.returncode == 2
    assert "JSON-MIN" in refused.stderr and "Traceback" not in refused.stderr


def test_a_skipped_reasoning_annotation_counts_a_box_on_another_image_once_under_its_own_reason():
    two_boxes = [rectangle("a", 10, 20, 35, 40), rectangle("b", 50, 50, 25, 25)]
    elsewhere = {**rectangle("z", 5, 5, 10, 10), "to_name": "other"}
    tasks = [task(20, [annotation(75, [*two_boxes, elsewhere, reasoning_answer("no")])], data={"image": URL})]

    report = convert(tasks, scheme=REASONING).report

    assert report["annotations_skipped"] == {"no_question": [75]}
    assert report["regions_skipped"] == {
        "annotation_no_question": ["75:a", "75:b"],
        "on_other_image": ["75:z"],
    }


def test_an_annotation_id_that_several_tasks_use_is_named_with_its_task():
    # Label Studio's own fixtures reuse annotation ids across tasks: the report names each "<task>/<id>".
    answered = [rectangle("r1", 10, 20, 35, 40), caption("r1", "a red circle")]
    tasks = [
        task(17, [annotation(9, answered, was_cancelled=True)]),
        task(18, [annotation(9, answered, was_cancelled=True)]),
        task(19, [annotation(10, answered, was_cancelled=True)]),
    ]

    report = convert(tasks).report

    assert report["annotations_skipped"] == {"cancelled": [10, "17/9", "18/9"]}  # in id order
    assert report["regions_skipped"] == {"annotation_cancelled": ["17/9:r1", "18/9:r1", "10:r1"]}
