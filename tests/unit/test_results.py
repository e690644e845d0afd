"""backend.results: LS results to regions, the describe job, and answers back to an LS prediction."""

import math
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.labeling import Prompts, scheme_from_config
from backend.results import (
    REASONING_QUESTION_ID,
    Region,
    closest_choice,
    describe_request,
    drawn_region,
    prediction_from_answers,
    region_from_item,
    regions_from_result,
    task_regions,
)
from worker.describe_request import parse_describe_request

CONFIGS = Path(__file__).resolve().parents[2] / "labeling_configs"


def load_scheme(name):
    return scheme_from_config((CONFIGS / name).read_text())


CAPTION = load_scheme("region_captioning.xml")
REGION_QA = load_scheme("region_qa.xml")
REASONING = load_scheme("multi_region_reasoning.xml")
CLASSIFICATION = load_scheme("region_classification.xml")


def rectangle(
    region_id, x, y, width, height, *, rotation=0, origin=None, size=(800, 600), labels=("Object",)
):
    """A rectanglelabels result item shaped like the ones LS sends (reference/label-studio.md §2.4, §2.7)."""
    item = {
        "id": region_id,
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": rotation,
            "rectanglelabels": list(labels),
        },
    }
    if size is not None:
        item.update(original_width=size[0], original_height=size[1], image_rotation=0)
    if origin is not None:
        item["origin"] = origin
    return item


def textarea(region_id, from_name, text, geometry=(60, 30, 25, 30)):
    x, y, width, height = geometry
    return {
        "id": region_id,
        "from_name": from_name,
        "to_name": "image",
        "type": "textarea",
        "original_width": 800,
        "original_height": 600,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "text": [text]},
    }


TASK = {"id": 17, "data": {"image": "/data/upload/3/abc.jpg"}, "annotations": [], "predictions": []}


# --- boxes --------------------------------------------------------------------------------------------


def test_box_is_the_percent_box_over_100():
    region = region_from_item(rectangle("r1", 60, 30, 25, 30, size=(640, 480)))
    assert region.box == (0.6, 0.3, 0.85, 0.6)
    assert (region.id, region.labels, region.original_width, region.original_height) == (
        "r1",
        ("Object",),
        640,
        480,
    )


def test_rotated_box_becomes_its_bounding_box_in_pixel_space():
    # 800x600 image: x=80 px, y=120 px, 160x60 px, turned 90° clockwise around its top-left corner,
    # covers x 20..80 px and y 120..280 px.
    region = region_from_item(rectangle("r1", 10, 20, 20, 10, rotation=90))
    assert region.box == (0.025, 0.2, 0.1, 0.466667)


def test_box_turned_half_way_lies_up_and_left_of_its_corner():
    # Corner at (400, 300) px, 160x60 px turned 180°: x 240..400, y 240..300.
    assert region_from_item(rectangle("r1", 50, 50, 20, 10, rotation=180)).box == (0.3, 0.4, 0.5, 0.5)


def test_rotated_box_without_image_size_treats_percent_space_as_square():
    region = region_from_item(rectangle("r1", 10, 20, 20, 10, rotation=90, size=None))
    assert region.box == (0.0, 0.2, 0.1, 0.4)
    assert (region.original_width, region.original_height) == (None, None)


def test_boxes_are_clipped_to_the_image():
    assert region_from_item(rectangle("r1", 90, 95, 20, 10)).box == (0.9, 0.95, 1.0, 1.0)
    # Turned 90°, a box at x=40 px that is 60 px tall reaches 20 px left of the image.
    assert region_from_item(rectangle("r2", 5, 20, 20, 10, rotation=90)).box[0] == 0.0


def test_a_rectangle_without_geometry_is_an_error():
    item = rectangle("r1", 10, 10, 10, 10)
    del item["value"]["width"]
    with pytest.raises(ValueError, match="rectangle 'r1' has no numeric x/y/width/height"):
        region_from_item(item)


def test_regions_from_result_keeps_only_the_rectangle_control_in_order():
    result = [
        rectangle("b", 10, 10, 10, 10),
        textarea("b", "caption", "a cat"),
        {"id": "x", "from_name": "other", "to_name": "image", "type": "rectanglelabels", "value": {}},
        rectangle("a", 50, 50, 10, 10),
    ]
    assert [region.id for region in regions_from_result(result, CAPTION)] == ["b", "a"]


# --- which regions ------------------------------------------------------------------------------------


def test_drawn_region_is_the_last_manual_rectangle():
    context = [
        rectangle("pred1", 10, 10, 10, 10, origin="prediction"),
        rectangle("new1", 40, 40, 10, 10, origin="manual"),
        rectangle("new2", 40, 40, 10, 10, origin="manual"),  # the same box again under another id
        rectangle("pred2", 70, 70, 10, 10, origin="prediction"),
    ]
    assert drawn_region(context, CAPTION).id == "new2"


def test_drawn_region_without_manual_rectangles_is_the_last_rectangle():
    context = [rectangle("p1", 10, 10, 10, 10, origin="prediction"), rectangle("p2", 20, 20, 10, 10)]
    assert drawn_region(context, CAPTION).id == "p2"


def test_drawn_region_needs_a_rectangle():
    with pytest.raises(ValueError, match="no rectangle from control 'label'"):
        drawn_region([textarea("r1", "caption", "hi")], CAPTION)


def entry(entry_id, updated_at, result, **extra):
    return {"id": entry_id, "created_at": updated_at, "updated_at": updated_at, "result": result, **extra}


def test_task_regions_skip_cancelled_annotations_and_take_the_newest():
    task = {
        **TASK,
        "annotations": [
            entry(1, "2025-01-01T10:00:00.000000Z", [rectangle("old", 10, 10, 10, 10)], was_cancelled=False),
            entry(2, "2025-01-02T10:00:00.000000Z", [rectangle("mid", 10, 10, 10, 10)], was_cancelled=False),
            entry(3, "2025-01-03T10:00:00.000000Z", [rectangle("gone", 10, 10, 10, 10)], was_cancelled=True),
        ],
        "drafts": [entry(9, "2025-01-04T10:00:00.000000Z", [rectangle("draft", 10, 10, 10, 10)])],
        "predictions": [entry(7, "2025-01-05T10:00:00.000000Z", [rectangle("pred", 10, 10, 10, 10)])],
    }
    regions, result = task_regions(task, CAPTION)
    assert [region.id for region in regions] == ["mid"]
    assert result == task["annotations"][1]["result"]


def test_task_regions_fall_back_to_the_newest_draft_then_prediction():
    empty_annotation = entry(1, "2025-01-03T10:00:00.000000Z", [], was_cancelled=False)
    predictions = [
        entry(7, "2025-01-05T10:00:00.000000Z", [rectangle("new-pred", 10, 10, 10, 10)]),
        entry(6, "2025-01-01T10:00:00.000000Z", [rectangle("old-pred", 10, 10, 10, 10)]),
    ]
    drafts = [
        entry(8, "2025-01-02T10:00:00.000000Z", [rectangle("old-draft", 10, 10, 10, 10)]),
        entry(9, "2025-01-04T10:00:00.000000Z", [rectangle("new-draft", 10, 10, 10, 10)]),
    ]
    with_drafts = {**TASK, "annotations": [empty_annotation], "drafts": drafts, "predictions": predictions}
    assert [region.id for region in task_regions(with_drafts, CAPTION)[0]] == ["new-draft"]

    without_drafts = {**TASK, "annotations": [empty_annotation], "predictions": predictions}
    assert [region.id for region in task_regions(without_drafts, CAPTION)[0]] == ["new-pred"]


def test_task_regions_of_a_bare_task_are_empty():
    assert task_regions(TASK, CAPTION) == ([], [])


# --- describe jobs ------------------------------------------------------------------------------------


TWO_BOXES = [rectangle("r1", 10, 20, 35, 40), rectangle("r2", 50, 50, 25, 25)]


def test_caption_job_asks_each_region():
    job = describe_request(TASK, regions_from_result(TWO_BOXES, CAPTION), CAPTION, Prompts())
    assert job == {
        "image": {"url": "/data/upload/3/abc.jpg", "task_id": 17},
        "regions": [{"id": "r1", "box": [0.1, 0.2, 0.45, 0.6]}, {"id": "r2", "box": [0.5, 0.5, 0.75, 0.75]}],
        "questions": [
            {"id": "r1:caption", "text": "Describe <region1> briefly.", "regions": ["r1"]},
            {"id": "r2:caption", "text": "Describe <region1> briefly.", "regions": ["r2"]},
        ],
        "max_new_tokens": 48,
    }


def test_interactive_job_asks_only_the_drawn_region():
    regions = regions_from_result(TWO_BOXES, CAPTION)
    job = describe_request(
        TASK, regions, CAPTION, Prompts(caption="Name <region1>."), only_region_id="r2", max_new_tokens=16
    )
    assert job["regions"] == [{"id": "r2", "box": [0.5, 0.5, 0.75, 0.75]}]
    assert job["questions"] == [{"id": "r2:caption", "text": "Name <region1>.", "regions": ["r2"]}]
    assert job["max_new_tokens"] == 16

    with pytest.raises(ValueError, match="task 17 has no rectangle with id 'r9'"):
        describe_request(TASK, regions, CAPTION, Prompts(), only_region_id="r9")


def test_classification_job_lists_the_choices():
    regions = regions_from_result([rectangle("r1", 10, 20, 35, 40)], CLASSIFICATION)
    job = describe_request(TASK, regions, CLASSIFICATION, Prompts())
    assert job["questions"] == [
        {
            "id": "r1:classification",
            "text": "What is <region1>? Answer with one of: Person, Vehicle, Animal, Furniture, Other.",
            "regions": ["r1"],
        }
    ]
    assert job["regions"] == [{"id": "r1", "box": [0.1, 0.2, 0.45, 0.6]}]


def test_region_qa_job_asks_the_typed_questions_and_skips_regions_without_one():
    result = [
        rectangle("r1", 10, 20, 35, 40),
        textarea("r1", "question", "What colour is it?"),
        rectangle("r2", 50, 50, 25, 25),
        rectangle("r3", 0, 0, 50, 50),
        textarea("r3", "question", " Is <region1> moving? "),
        textarea("r3", "answer", "an old answer"),
    ]
    job = describe_request(
        TASK, regions_from_result(result, REGION_QA), REGION_QA, Prompts(), source_result=result
    )
    assert job["regions"] == [
        {"id": "r1", "box": [0.1, 0.2, 0.45, 0.6]},
        {"id": "r3", "box": [0.0, 0.0, 0.5, 0.5]},
    ]
    assert job["questions"] == [
        {"id": "r1:region_qa", "text": "<region1>: What colour is it?", "regions": ["r1"]},
        {"id": "r3:region_qa", "text": "Is <region1> moving?", "regions": ["r3"]},
    ]


def test_region_qa_question_about_another_region_is_an_error():
    result = [rectangle("r1", 10, 20, 35, 40), textarea("r1", "question", "Is <region1> left of <region2>?")]
    with pytest.raises(ValueError, match=r"region 'r1' refers to <region2>, but there are only 1 rectangles"):
        describe_request(
            TASK, regions_from_result(result, REGION_QA), REGION_QA, Prompts(), source_result=result
        )


def test_region_qa_needs_the_source_result():
    with pytest.raises(ValueError, match="region_qa needs source_result"):
        describe_request(TASK, regions_from_result(TWO_BOXES, REGION_QA), REGION_QA, Prompts())


VCR_TASK = {
    "id": 21,
    "data": {"image": "/data/upload/3/vcr.jpg", "question": "Why is <region2> looking at <region1>?"},
}


def test_reasoning_job_asks_the_task_question_about_all_rectangles_in_order():
    job = describe_request(VCR_TASK, regions_from_result(TWO_BOXES, REASONING), REASONING, Prompts())
    assert job == {
        "image": {"url": "/data/upload/3/vcr.jpg", "task_id": 21},
        "regions": [{"id": "r1", "box": [0.1, 0.2, 0.45, 0.6]}, {"id": "r2", "box": [0.5, 0.5, 0.75, 0.75]}],
        "questions": [
            {
                "id": REASONING_QUESTION_ID,
                "text": "Why is <region2> looking at <region1>?",
                "regions": ["r1", "r2"],
            }
        ],
        "max_new_tokens": 48,
    }


def test_reasoning_question_naming_a_missing_rectangle_is_an_error():
    regions = regions_from_result(TWO_BOXES[:1], REASONING)
    with pytest.raises(
        ValueError, match=r"question of task 21 refers to <region2>, but there are only 1 rectangles"
    ):
        describe_request(VCR_TASK, regions, REASONING, Prompts())


THREE_BOXES = [*TWO_BOXES, rectangle("r3", 0, 0, 50, 50)]


@pytest.mark.parametrize(
    ("question", "sent", "regions"),
    [
        ("Is <region1> left of <region3>?", "Is <region1> left of <region2>?", ["r1", "r3"]),
        ("Why is <region3> looking at <region2>?", "Why is <region2> looking at <region1>?", ["r2", "r3"]),
        (
            "What is <region2> holding? Is <region2> red?",
            "What is <region1> holding? Is <region1> red?",
            ["r2"],
        ),
        ("What happens here?", "What happens here?", []),
    ],
)
def test_reasoning_job_lists_only_the_mentioned_rectangles_and_renumbers_the_question(
    question, sent, regions
):
    task = {**VCR_TASK, "data": {**VCR_TASK["data"], "question": question}}
    job = describe_request(task, regions_from_result(THREE_BOXES, REASONING), REASONING, Prompts())

    assert job["questions"] == [{"id": REASONING_QUESTION_ID, "text": sent, "regions": regions}]
    assert [region["id"] for region in job["regions"]] == regions
    # The worker's own check: <regionK> is the K-th listed region, and every listed region is mentioned.
    [parsed] = parse_describe_request(job, default_max_new_tokens=48).questions
    boxes = {region.id: region.box for region in regions_from_result(THREE_BOXES, REASONING)}
    assert parsed.boxes == tuple(boxes[region_id] for region_id in regions)


def test_reasoning_rejects_only_region_id():
    with pytest.raises(ValueError, match="only_region_id does not apply to the reasoning kind"):
        describe_request(
            VCR_TASK, regions_from_result(TWO_BOXES, REASONING), REASONING, Prompts(), only_region_id="r1"
        )


def test_reasoning_task_without_its_question_is_an_error():
    task = {"id": 22, "data": {"image": "/data/upload/3/vcr.jpg"}}
    with pytest.raises(ValueError, match="task 22 has no 'question' in its data"):
        describe_request(task, [], REASONING, Prompts())


def test_task_without_its_image_is_an_error():
    with pytest.raises(ValueError, match="task 5 has no 'image' in its data"):
        describe_request({"id": 5, "data": {"img": "x.jpg"}}, [], CAPTION, Prompts())


# --- predictions --------------------------------------------------------------------------------------


def assert_valid(scheme, prediction):
    assert LabelInterface(scheme.label_config).validate_prediction(prediction, return_errors=True) == []


def test_caption_prediction_echoes_each_answered_rectangle_with_its_caption():
    context = [rectangle("r1", 60, 30, 25, 30, origin="manual", size=(640, 480)), rectangle("r2", 1, 1, 5, 5)]
    regions = regions_from_result(context, CAPTION)
    answers = [{"id": "r1:caption", "text": "a green ellipse", "score": -0.25}]

    prediction = prediction_from_answers(CAPTION, regions, answers, "v3")

    probability = math.exp(-0.25)
    assert prediction == {
        "result": [
            {
                "id": "r1",
                "from_name": "label",
                "to_name": "image",
                "type": "rectanglelabels",
                "original_width": 640,
                "original_height": 480,
                "image_rotation": 0,
                "value": {
                    "x": 60,
                    "y": 30,
                    "width": 25,
                    "height": 30,
                    "rotation": 0,
                    "rectanglelabels": ["Object"],
                },
                "score": probability,
            },
            {
                "id": "r1",
                "from_name": "caption",
                "to_name": "image",
                "type": "textarea",
                "original_width": 640,
                "original_height": 480,
                "image_rotation": 0,
                "value": {
                    "x": 60,
                    "y": 30,
                    "width": 25,
                    "height": 30,
                    "rotation": 0,
                    "text": ["a green ellipse"],
                },
                "score": probability,
            },
        ],
        "score": probability,
        "model_version": "v3",
    }
    assert_valid(CAPTION, prediction)


def test_prediction_score_is_the_mean_probability():
    regions = regions_from_result(TWO_BOXES, CAPTION)
    answers = [
        {"id": "r1:caption", "text": "a", "score": 0.0},
        {"id": "r2:caption", "text": "b", "score": -1.0},
    ]
    prediction = prediction_from_answers(CAPTION, regions, answers, "v3")
    assert prediction["score"] == pytest.approx((1.0 + math.exp(-1.0)) / 2)
    assert [item["id"] for item in prediction["result"]] == ["r1", "r1", "r2", "r2"]


def test_unlabeled_rectangle_gets_the_default_label_when_echoed():
    regions = regions_from_result([rectangle("r1", 10, 10, 10, 10, labels=())], CAPTION)
    prediction = prediction_from_answers(
        CAPTION, regions, [{"id": "r1:caption", "text": "x", "score": -1}], "v3"
    )
    assert prediction["result"][0]["value"]["rectanglelabels"] == ["Object"]


def test_nothing_answered_gives_an_empty_prediction():
    prediction = prediction_from_answers(CAPTION, regions_from_result(TWO_BOXES, CAPTION), [], "v3")
    assert prediction == {"result": [], "score": 0.0, "model_version": "v3"}


def test_region_qa_prediction_fills_the_answer_textarea():
    regions = regions_from_result(TWO_BOXES, REGION_QA)
    prediction = prediction_from_answers(
        REGION_QA, regions, [{"id": "r2:region_qa", "text": "red", "score": -0.1}], "v3"
    )
    answer = prediction["result"][1]
    assert (answer["id"], answer["from_name"], answer["value"]["text"]) == ("r2", "answer", ["red"])
    assert_valid(REGION_QA, prediction)


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ("Vehicle", "Vehicle"),
        ("vehicle.", "Vehicle"),
        ("It is a small animal", "Animal"),
        ("furniture, probably a chair", "Furniture"),
        ("a banana", None),
        ("the", None),
    ],
)
def test_closest_choice(text, choice):
    assert closest_choice(text, CLASSIFICATION.choices) == choice


def test_closest_choice_prefers_more_shared_words_then_the_earlier_choice():
    assert closest_choice("a red sports car", ("car", "sports car", "red")) == "sports car"
    assert closest_choice("a car", ("red car", "blue car")) == "red car"


def test_classification_prediction_maps_to_allowed_choices_and_keeps_unmatched_boxes_without_one():
    result = [rectangle("r1", 10, 20, 35, 40), rectangle("r2", 50, 50, 25, 25)]
    regions = regions_from_result(result, CLASSIFICATION)
    answers = [
        {"id": "r1:classification", "text": "It looks like a person.", "score": -0.5},
        {"id": "r2:classification", "text": "a banana", "score": -0.1},
    ]
    prediction = prediction_from_answers(CLASSIFICATION, regions, answers, "v3")
    assert [(item["id"], item["type"]) for item in prediction["result"]] == [
        ("r1", "rectanglelabels"),
        ("r1", "choices"),
        ("r2", "rectanglelabels"),  # the box stays in the UI; only the unusable answer is left out
    ]
    assert prediction["result"][1]["value"] == {
        "x": 10,
        "y": 20,
        "width": 35,
        "height": 40,
        "rotation": 0,
        "choices": ["Person"],
    }
    unmatched = prediction["result"][2]
    assert unmatched["value"] == result[1]["value"] and "score" not in unmatched
    assert prediction["score"] == pytest.approx(math.exp(-0.5))  # only the answer that was used counts
    assert_valid(CLASSIFICATION, prediction)


def test_a_drawn_box_whose_answer_matches_no_choice_is_echoed_alone():
    drawn = drawn_region([rectangle("new", 40, 40, 10, 10, origin="manual")], CLASSIFICATION)
    answers = [{"id": "new:classification", "text": "a banana", "score": -0.1}]

    prediction = prediction_from_answers(CLASSIFICATION, [drawn], answers, "v3")

    [box] = prediction["result"]
    assert (box["id"], box["type"], box["value"]["rectanglelabels"]) == ("new", "rectanglelabels", ["Object"])
    assert "origin" not in box
    assert prediction["score"] == 0.0
    assert_valid(CLASSIFICATION, prediction)


def test_an_empty_caption_leaves_the_box_without_a_caption():
    regions = regions_from_result(TWO_BOXES, CAPTION)
    answers = [
        {"id": "r1:caption", "text": "  ", "score": -0.2},
        {"id": "r2:caption", "text": "a red square", "score": -0.4},
    ]
    prediction = prediction_from_answers(CAPTION, regions, answers, "v3")
    assert [(item["id"], item["type"]) for item in prediction["result"]] == [
        ("r1", "rectanglelabels"),
        ("r2", "rectanglelabels"),
        ("r2", "textarea"),
    ]
    assert prediction["score"] == pytest.approx(math.exp(-0.4))


def test_region_qa_prediction_echoes_the_typed_question_with_the_answer():
    result = [
        rectangle("r1", 10, 20, 35, 40, size=(640, 480)),
        {  # as the e2e tasks and an API import write it: text only, no geometry
            "id": "r1",
            "from_name": "question",
            "to_name": "image",
            "type": "textarea",
            "value": {"text": ["What colour", "is it?"]},
        },
        rectangle("r2", 50, 50, 25, 25),
    ]
    regions = regions_from_result(result, REGION_QA)
    answers = [{"id": "r1:region_qa", "text": "red", "score": -0.1}]

    prediction = prediction_from_answers(REGION_QA, regions, answers, "v3")

    box, question, answer = prediction["result"]
    geometry = {"x": 10, "y": 20, "width": 35, "height": 40, "rotation": 0}
    assert question == {
        "original_width": 640,
        "original_height": 480,
        "image_rotation": 0,
        "id": "r1",
        "from_name": "question",
        "to_name": "image",
        "type": "textarea",
        "value": {**geometry, "text": ["What colour", "is it?"]},
    }
    assert (box["id"], answer["id"], answer["from_name"]) == ("r1", "r1", "answer")
    assert answer["value"] == {**geometry, "text": ["red"]}
    assert_valid(REGION_QA, prediction)


def test_the_drawn_region_carries_its_typed_question_and_an_unusable_answer_keeps_it():
    context = [
        rectangle("new", 40, 40, 10, 10, origin="manual"),
        textarea("new", "question", "Is it moving?", geometry=(40, 40, 10, 10)),
        textarea("other", "question", "not this one"),
    ]
    drawn = drawn_region(context, REGION_QA)
    prediction = prediction_from_answers(
        REGION_QA, [drawn], [{"id": "new:region_qa", "text": "", "score": -0.1}], "v3"
    )
    assert [(item["from_name"], item["value"].get("text")) for item in prediction["result"]] == [
        ("label", None),
        ("question", ["Is it moving?"]),
    ]
    assert_valid(REGION_QA, prediction)


def test_reasoning_prediction_adds_one_task_level_answer():
    regions = regions_from_result(TWO_BOXES, REASONING)
    answers = [{"id": REASONING_QUESTION_ID, "text": "Because <region1> called.", "score": -0.3}]
    prediction = prediction_from_answers(REASONING, regions, answers, "v3")
    *rectangles, answer = prediction["result"]
    assert [item["id"] for item in rectangles] == ["r1", "r2"]
    assert answer["id"] not in {"r1", "r2"} and answer["id"]
    assert {k: answer[k] for k in ("from_name", "to_name", "type", "value")} == {
        "from_name": "answer",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": ["Because <region1> called."]},
    }
    assert prediction["score"] == pytest.approx(math.exp(-0.3))
    assert_valid(REASONING, prediction)


def test_reasoning_answer_names_the_regions_as_the_task_question_does():
    regions = regions_from_result(THREE_BOXES, REASONING)
    task = {**VCR_TASK, "data": {**VCR_TASK["data"], "question": "Is <region3> larger than <region1>?"}}
    job = describe_request(task, regions, REASONING, Prompts())
    assert job["questions"][0]["text"] == "Is <region2> larger than <region1>?"
    answers = [{"id": REASONING_QUESTION_ID, "text": "No, <region1> is; region2 is small.", "score": -0.3}]

    prediction = prediction_from_answers(REASONING, regions, answers, "v3", request=job)

    *rectangles, answer = prediction["result"]
    assert [item["id"] for item in rectangles] == ["r1", "r2", "r3"]  # every box of the task is echoed
    assert answer["value"]["text"] == ["No, <region1> is; region3 is small."]
    without_request = prediction_from_answers(REASONING, regions, answers, "v3")
    assert without_request["result"][-1]["value"]["text"] == ["No, <region1> is; region2 is small."]


def test_reasoning_answer_for_a_job_about_other_rectangles_is_an_error():
    job = {"questions": [{"id": REASONING_QUESTION_ID, "text": "<region1>?", "regions": ["r9"]}]}
    answers = [{"id": REASONING_QUESTION_ID, "text": "yes", "score": -0.3}]
    with pytest.raises(ValueError, match="asked about region 'r9', which is not among the rectangles"):
        prediction_from_answers(
            REASONING, regions_from_result(TWO_BOXES, REASONING), answers, "v3", request=job
        )


def test_an_empty_reasoning_answer_leaves_the_rectangles_without_it():
    regions = regions_from_result(TWO_BOXES, REASONING)
    answers = [{"id": REASONING_QUESTION_ID, "text": "", "score": -0.3}]
    prediction = prediction_from_answers(REASONING, regions, answers, "v3")
    assert [(item["id"], item["type"]) for item in prediction["result"]] == [
        ("r1", "rectanglelabels"),
        ("r2", "rectanglelabels"),
    ]
    assert prediction["score"] == 0.0


def test_a_prediction_that_does_not_fit_the_config_is_an_error():
    regions = regions_from_result([rectangle("r1", 10, 10, 10, 10, labels=("Person",))], CAPTION)
    with pytest.raises(
        ValueError, match="the prediction does not fit the label config: Region 0: Invalid value"
    ):
        prediction_from_answers(CAPTION, regions, [{"id": "r1:caption", "text": "x", "score": -1}], "v3")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"id": "r1:caption", "text": "x", "score": 0.7}, "expected a mean token log-probability"),
        ({"id": "r1:caption", "text": "x"}, "needs a numeric 'score'"),
        ({"id": "r1:caption", "score": -1.0}, "answer 0 needs a string 'id' and 'text'"),
    ],
)
def test_malformed_answers_are_errors(answer, message):
    regions = regions_from_result(TWO_BOXES, CAPTION)
    with pytest.raises(ValueError, match=message):
        prediction_from_answers(CAPTION, regions, [answer], "v3")


def test_a_region_built_by_hand_cannot_be_echoed():
    region = Region(id="r1", box=(0.1, 0.1, 0.2, 0.2))
    with pytest.raises(ValueError, match="region 'r1' has no LS result item to echo"):
        prediction_from_answers(CAPTION, [region], [{"id": "r1:caption", "text": "x", "score": -1}], "v3")
