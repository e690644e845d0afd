"""backend.predictions: the worker's answers back to a Label Studio prediction that echoes the rectangles."""

import logging
import math
import re

import pytest
from ls_results import (
    CAPTION,
    CLASSIFICATION,
    REASONING,
    REGION_QA,
    THREE_BOXES,
    TWO_BOXES,
    VCR_TASK,
    rectangle,
    textarea,
)

from backend.describe_jobs import REASONING_QUESTION_ID, describe_request
from backend.predictions import (
    FAILED_MARK,
    TRUNCATED_MARK,
    closest_choice,
    failure_prediction,
    prediction_from_answers,
)
from backend.regions import Region, drawn_region, regions_from_result
from roi_contract.describe import DescribeRequest, DescribeResult
from roi_contract.project import Prompts
from roi_contract.validation import ContractError, parse

# --- predictions --------------------------------------------------------------------------------------


def assert_valid(scheme, prediction):
    assert scheme.interface.validate_prediction(prediction, return_errors=True) == []


def answered(answers, version="v3") -> DescribeResult:
    return DescribeResult.model_validate({"model_version": version, "answers": answers})


def test_caption_prediction_echoes_each_answered_rectangle_with_its_caption():
    context = [rectangle("r1", 60, 30, 25, 30, origin="manual", size=(640, 480)), rectangle("r2", 1, 1, 5, 5)]
    regions = regions_from_result(context, CAPTION)
    answers = [{"id": "r1:caption", "text": "a green ellipse", "score": -0.25}]

    prediction = prediction_from_answers(CAPTION, regions, answered(answers))

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
    prediction = prediction_from_answers(CAPTION, regions, answered(answers))
    assert prediction["score"] == pytest.approx((1.0 + math.exp(-1.0)) / 2)
    assert [item["id"] for item in prediction["result"]] == ["r1", "r1", "r2", "r2"]


def test_unlabeled_rectangle_gets_the_default_label_when_echoed():
    regions = regions_from_result([rectangle("r1", 10, 10, 10, 10, labels=())], CAPTION)
    prediction = prediction_from_answers(
        CAPTION, regions, answered([{"id": "r1:caption", "text": "x", "score": -1}])
    )
    assert prediction["result"][0]["value"]["rectanglelabels"] == ["Object"]


def test_nothing_answered_gives_an_empty_prediction():
    prediction = prediction_from_answers(CAPTION, regions_from_result(TWO_BOXES, CAPTION), answered([]))
    assert prediction == {"result": [], "score": 0.0, "model_version": "v3"}


def test_region_qa_prediction_fills_the_answer_textarea():
    regions = regions_from_result(TWO_BOXES, REGION_QA)
    prediction = prediction_from_answers(
        REGION_QA, regions, answered([{"id": "r2:region_qa", "text": "red", "score": -0.1}])
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
    prediction = prediction_from_answers(CLASSIFICATION, regions, answered(answers))
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

    prediction = prediction_from_answers(CLASSIFICATION, [drawn], answered(answers))

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
    prediction = prediction_from_answers(CAPTION, regions, answered(answers))
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

    prediction = prediction_from_answers(REGION_QA, regions, answered(answers))

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
        REGION_QA, [drawn], answered([{"id": "new:region_qa", "text": "", "score": -0.1}])
    )
    assert [(item["from_name"], item["value"].get("text")) for item in prediction["result"]] == [
        ("label", None),
        ("question", ["Is it moving?"]),
    ]
    assert_valid(REGION_QA, prediction)


def test_reasoning_prediction_adds_one_task_level_answer():
    regions = regions_from_result(TWO_BOXES, REASONING)
    answers = [{"id": REASONING_QUESTION_ID, "text": "Because <region1> called.", "score": -0.3}]
    prediction = prediction_from_answers(REASONING, regions, answered(answers))
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
    assert job.questions[0].text == "Is <region2> larger than <region1>?"
    answers = [{"id": REASONING_QUESTION_ID, "text": "No, <region1> is; region2 is small.", "score": -0.3}]

    prediction = prediction_from_answers(REASONING, regions, answered(answers), request=job)

    *rectangles, answer = prediction["result"]
    assert [item["id"] for item in rectangles] == ["r1", "r2", "r3"]  # every box of the task is echoed
    assert answer["value"]["text"] == ["No, <region1> is; region3 is small."]
    without_request = prediction_from_answers(REASONING, regions, answered(answers))
    assert without_request["result"][-1]["value"]["text"] == ["No, <region1> is; region2 is small."]


def test_reasoning_answer_for_a_job_about_other_rectangles_is_an_error():
    job = DescribeRequest.model_validate(
        {
            "image": {"url": "a.png"},
            "regions": [{"id": "r9", "box": [0.1, 0.1, 0.2, 0.2]}],
            "questions": [{"id": REASONING_QUESTION_ID, "text": "<region1>?", "regions": ["r9"]}],
        }
    )
    answers = [{"id": REASONING_QUESTION_ID, "text": "yes", "score": -0.3}]
    with pytest.raises(ValueError, match="asked about region 'r9', which is not among the rectangles"):
        prediction_from_answers(
            REASONING, regions_from_result(TWO_BOXES, REASONING), answered(answers), request=job
        )


def test_an_empty_reasoning_answer_leaves_the_rectangles_without_it():
    regions = regions_from_result(TWO_BOXES, REASONING)
    answers = [{"id": REASONING_QUESTION_ID, "text": "", "score": -0.3}]
    prediction = prediction_from_answers(REASONING, regions, answered(answers))
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
        prediction_from_answers(CAPTION, regions, answered([{"id": "r1:caption", "text": "x", "score": -1}]))


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            {"id": "r1:caption", "text": "x", "score": 0.7},
            "answers.0.score: Input should be less than or equal",
        ),
        ({"id": "r1:caption", "text": "x"}, "answers.0.score: Field required"),
        ({"id": "r1:caption", "score": -1.0}, "answers.0.text: Field required"),
        ({"id": "r1:caption", "text": 3, "score": -1.0}, "answers.0.text: Input should be a valid string"),
    ],
)
def test_malformed_answers_are_refused_by_the_contract(answer, message):
    with pytest.raises(ContractError, match=message):
        parse(DescribeResult, {"model_version": "v3", "answers": [answer]}, "the worker's answer")


def test_a_region_built_by_hand_cannot_be_echoed():
    region = Region(id="r1", box=(0.1, 0.1, 0.2, 0.2))
    with pytest.raises(ValueError, match="region 'r1' has no LS result item to echo"):
        prediction_from_answers(CAPTION, [region], answered([{"id": "r1:caption", "text": "x", "score": -1}]))


def test_an_answer_cut_off_by_the_token_limit_says_so():
    regions = regions_from_result(TWO_BOXES, CAPTION)
    answers = [{"id": "r1:caption", "text": "a large red", "score": -0.2, "truncated": True}]

    prediction = prediction_from_answers(CAPTION, regions, answered(answers))

    assert prediction["result"][1]["value"]["text"] == [f"a large red {TRUNCATED_MARK}"]


def test_closest_choice_takes_the_exact_choice_over_one_sharing_a_word():
    # "Car." shares its one word with both choices: only the exact match says which one was meant.
    assert closest_choice("Car.", ("Red car", "Car")) == "Car"
    # Only punctuation and spaces are stripped, never letters.
    assert closest_choice("Xbox", ("Box", "Xbox")) == "Xbox"


def test_the_task_level_answer_carries_its_probability_and_a_fresh_id():
    regions = regions_from_result(TWO_BOXES, REASONING)
    answers = [{"id": REASONING_QUESTION_ID, "text": "Because <region1> called.", "score": -0.3}]

    answer = prediction_from_answers(REASONING, regions, answered(answers))["result"][-1]

    assert answer["score"] == pytest.approx(math.exp(-0.3))
    assert re.fullmatch(r"[0-9a-f]{10}", answer["id"]), answer["id"]


def test_references_to_regions_the_job_did_not_ask_about_stay_as_written():
    regions = regions_from_result(THREE_BOXES, REASONING)
    job = DescribeRequest.model_validate(
        {
            "image": {"url": "a.png"},
            "regions": [{"id": "r3", "box": [0.0, 0.0, 0.5, 0.5]}],
            "questions": [{"id": REASONING_QUESTION_ID, "text": "What is <region1>?", "regions": ["r3"]}],
        }
    )
    answers = [{"id": REASONING_QUESTION_ID, "text": "<region1> is next to region7.", "score": -0.3}]

    prediction = prediction_from_answers(REASONING, regions, answered(answers), request=job)

    assert prediction["result"][-1]["value"]["text"] == ["<region3> is next to region7."]


def test_a_job_without_the_task_level_question_leaves_the_references_as_written():
    regions = regions_from_result(TWO_BOXES, REASONING)
    job = DescribeRequest.model_validate(
        {
            "image": {"url": "a.png"},
            "regions": [{"id": "r2", "box": [0.5, 0.5, 0.75, 0.75]}],
            "questions": [{"id": "r2:caption", "text": "<region1>?", "regions": ["r2"]}],
        }
    )
    answers = [{"id": REASONING_QUESTION_ID, "text": "<region1> and <region2>.", "score": -0.3}]

    prediction = prediction_from_answers(REASONING, regions, answered(answers), request=job)

    assert prediction["result"][-1]["value"]["text"] == ["<region1> and <region2>."]


def test_a_score_a_hair_above_zero_is_a_probability_of_one():
    regions = regions_from_result(TWO_BOXES, CAPTION)
    answers = [{"id": "r1:caption", "text": "a red square", "score": 1e-3}]  # float rounding, as allowed

    prediction = prediction_from_answers(CAPTION, regions, answered(answers))

    assert prediction["score"] == prediction["result"][1]["score"] == 1.0


def test_a_typed_question_without_lines_is_not_echoed():
    result = [
        rectangle("r1", 10, 20, 35, 40),
        {**textarea("r1", "question", "unused"), "value": {"text": []}},
    ]
    regions = regions_from_result(result, REGION_QA)

    prediction = prediction_from_answers(
        REGION_QA, regions, answered([{"id": "r1:region_qa", "text": "red", "score": -0.1}])
    )

    assert [item["from_name"] for item in prediction["result"]] == ["label", "answer"]


# --- failure predictions -------------------------------------------------------------------------------

WHY = "the worker could not answer: " + "x" * 271 + "TAIL"  # 304 characters: the last 4 are cut


def test_a_failed_caption_keeps_each_box_and_says_why_in_its_caption():
    result = [rectangle("r1", 10, 20, 35, 40, size=(640, 480)), rectangle("r2", 1, 2, 3, 4)]
    regions = regions_from_result(result, CAPTION)
    kept = [{**rectangle("p1", 50, 50, 25, 25), "origin": "prediction", "score": 0.4}]

    prediction = failure_prediction(CAPTION, regions, WHY, kept=kept)

    geometry = {"x": 10, "y": 20, "width": 35, "height": 40, "rotation": 0}
    size = {"original_width": 640, "original_height": 480, "image_rotation": 0}
    assert prediction == {
        "result": [
            {
                "id": "r1",
                "from_name": "label",
                "to_name": "image",
                "type": "rectanglelabels",
                **size,
                "value": {**geometry, "rectanglelabels": ["Object"]},
            },
            {
                **size,
                "id": "r1",
                "from_name": "caption",
                "to_name": "image",
                "type": "textarea",
                "value": {**geometry, "text": [f"[no answer: {WHY[:300]}]"]},
            },
            result[1],
            {
                "original_width": 800,
                "original_height": 600,
                "image_rotation": 0,
                "id": "r2",
                "from_name": "caption",
                "to_name": "image",
                "type": "textarea",
                "value": {
                    "x": 1,
                    "y": 2,
                    "width": 3,
                    "height": 4,
                    "rotation": 0,
                    "text": [f"[no answer: {WHY[:300]}]"],
                },
            },
            rectangle("p1", 50, 50, 25, 25),  # the other boxes as they were, without origin or score
        ],
        "score": 0.0,
        "model_version": "none",
    }
    assert WHY[:300].endswith("x") and FAILED_MARK == "[no answer:"
    assert_valid(CAPTION, prediction)


def test_a_failed_region_question_keeps_the_box_and_the_typed_question():
    context = [
        rectangle("new", 40, 40, 10, 10, origin="manual"),
        textarea("new", "question", "Is it moving?", geometry=(40, 40, 10, 10)),
    ]
    drawn = drawn_region(context, REGION_QA)

    prediction = failure_prediction(REGION_QA, [drawn], "no answer within 5 s")

    assert [(item["id"], item["from_name"], item["type"]) for item in prediction["result"]] == [
        ("new", "label", "rectanglelabels"),
        ("new", "question", "textarea"),
        ("new", "answer", "textarea"),
    ]
    _, question, answer = prediction["result"]
    geometry = {"x": 40, "y": 40, "width": 10, "height": 10, "rotation": 0}
    assert question["value"] == {**geometry, "text": ["Is it moving?"]}
    assert answer["value"] == {**geometry, "text": ["[no answer: no answer within 5 s]"]}
    assert_valid(REGION_QA, prediction)


def test_a_failed_reasoning_answer_keeps_the_boxes_and_says_why_in_the_task_answer():
    regions = regions_from_result(TWO_BOXES, REASONING)
    kept = [rectangle("p1", 1, 1, 5, 5)]

    prediction = failure_prediction(REASONING, regions, "cannot fetch the image", kept=kept)

    first, second, answer, other = prediction["result"]
    assert [first, second, other] == [*TWO_BOXES, kept[0]]
    assert {key: value for key, value in answer.items() if key != "id"} == {
        "from_name": "answer",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": ["[no answer: cannot fetch the image]"]},
    }
    assert answer["id"] not in {"r1", "r2", "p1"}
    assert (prediction["score"], prediction["model_version"]) == (0.0, "none")
    assert_valid(REASONING, prediction)


def test_a_failed_classification_has_no_failure_prediction():
    regions = regions_from_result(TWO_BOXES, CLASSIFICATION)
    assert failure_prediction(CLASSIFICATION, regions, "no answer within 5 s") is None


def test_each_answer_left_out_is_logged_with_why(caplog):
    caplog.set_level(logging.INFO, logger="backend.predictions")
    classified = regions_from_result(TWO_BOXES, CLASSIFICATION)
    captioned = regions_from_result(TWO_BOXES, CAPTION)
    reasoned = regions_from_result(TWO_BOXES, REASONING)

    prediction_from_answers(
        CLASSIFICATION, classified, answered([{"id": "r1:classification", "text": "a banana", "score": -0.1}])
    )
    prediction_from_answers(CAPTION, captioned, answered([{"id": "r2:caption", "text": " ", "score": -0.1}]))
    prediction_from_answers(
        REASONING, reasoned, answered([{"id": REASONING_QUESTION_ID, "text": "", "score": -0.1}])
    )

    assert [record.getMessage() for record in caplog.records] == [
        "region r1: the answer 'a banana' matches none of the choices "
        f"{list(CLASSIFICATION.choices)}; the box is echoed without it",
        "region r2: the answer ' ' is empty; the box is echoed without it",
        "task-level answer is empty; the rectangles are echoed without it",
    ]


def test_every_misfit_of_a_prediction_is_named():
    boxes = [
        rectangle("r1", 10, 10, 10, 10, labels=("Person",)),
        rectangle("r2", 20, 20, 10, 10, labels=("Car",)),
    ]
    answers = [{"id": "r1:caption", "text": "x", "score": -1}, {"id": "r2:caption", "text": "y", "score": -1}]

    with pytest.raises(ValueError) as misfit:
        prediction_from_answers(CAPTION, regions_from_result(boxes, CAPTION), answered(answers))

    message = str(misfit.value)
    assert message.startswith("the prediction does not fit the label config: Region 0: ")
    assert "; Region 2: " in message, message
