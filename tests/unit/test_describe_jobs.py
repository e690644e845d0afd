"""backend.describe_jobs: the questions each labeling scheme asks about a task's regions."""

import pytest
from ls_results import (
    CAPTION,
    CLASSIFICATION,
    REASONING,
    REGION_QA,
    TASK,
    THREE_BOXES,
    TWO_BOXES,
    VCR_TASK,
    rectangle,
    textarea,
)

from backend.describe_jobs import REASONING_QUESTION_ID, describe_request
from backend.regions import regions_from_result
from roi_contract.project import Prompts

# --- describe jobs ------------------------------------------------------------------------------------


def test_caption_job_asks_each_region():
    job = describe_request(TASK, regions_from_result(TWO_BOXES, CAPTION), CAPTION, Prompts())
    assert job.model_dump() == {
        "image": {"url": "/data/upload/3/abc.jpg", "task_id": 17},
        "regions": [{"id": "r1", "box": [0.1, 0.2, 0.45, 0.6]}, {"id": "r2", "box": [0.5, 0.5, 0.75, 0.75]}],
        "questions": [
            {"id": "r1:caption", "text": "Describe <region1> briefly.", "regions": ["r1"]},
            {"id": "r2:caption", "text": "Describe <region1> briefly.", "regions": ["r2"]},
        ],
        "max_new_tokens": 48,
        "project": None,  # the backend sets the asking project when it enqueues
    }


def test_interactive_job_asks_only_the_drawn_region():
    regions = regions_from_result(TWO_BOXES, CAPTION)
    job = describe_request(
        TASK, regions, CAPTION, Prompts(caption="Name <region1>."), only_region_id="r2", max_new_tokens=16
    )
    assert job.model_dump()["regions"] == [{"id": "r2", "box": [0.5, 0.5, 0.75, 0.75]}]
    assert job.model_dump()["questions"] == [
        {"id": "r2:caption", "text": "Name <region1>.", "regions": ["r2"]}
    ]
    assert job.model_dump()["max_new_tokens"] == 16

    with pytest.raises(ValueError, match="task 17 has no rectangle with id 'r9'"):
        describe_request(TASK, regions, CAPTION, Prompts(), only_region_id="r9")


def test_classification_job_lists_the_choices():
    regions = regions_from_result([rectangle("r1", 10, 20, 35, 40)], CLASSIFICATION)
    job = describe_request(TASK, regions, CLASSIFICATION, Prompts())
    assert job.model_dump()["questions"] == [
        {
            "id": "r1:classification",
            "text": "What is <region1>? Answer with one of: Person, Vehicle, Animal, Furniture, Other.",
            "regions": ["r1"],
        }
    ]
    assert job.model_dump()["regions"] == [{"id": "r1", "box": [0.1, 0.2, 0.45, 0.6]}]


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
    assert job.model_dump()["regions"] == [
        {"id": "r1", "box": [0.1, 0.2, 0.45, 0.6]},
        {"id": "r3", "box": [0.0, 0.0, 0.5, 0.5]},
    ]
    assert job.model_dump()["questions"] == [
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


def test_reasoning_job_asks_the_task_question_about_all_rectangles_in_order():
    job = describe_request(VCR_TASK, regions_from_result(TWO_BOXES, REASONING), REASONING, Prompts())
    assert job.model_dump() == {
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
        "project": None,  # the backend sets the asking project when it enqueues
    }


def test_reasoning_question_naming_a_missing_rectangle_is_an_error():
    regions = regions_from_result(TWO_BOXES[:1], REASONING)
    with pytest.raises(
        ValueError, match=r"question of task 21 refers to <region2>, but there are only 1 rectangles"
    ):
        describe_request(VCR_TASK, regions, REASONING, Prompts())


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

    assert job.model_dump()["questions"] == [{"id": REASONING_QUESTION_ID, "text": sent, "regions": regions}]
    assert [region["id"] for region in job.model_dump()["regions"]] == regions
    # <regionK> is the K-th listed region (the contract checks every listed region is mentioned).
    boxes = {region.id: list(region.box) for region in regions_from_result(THREE_BOXES, REASONING)}
    assert job.boxes_of(job.questions[0]) == [boxes[region_id] for region_id in regions]


def test_reasoning_rejects_only_region_id():
    with pytest.raises(ValueError, match="only_region_id does not apply to the reasoning kind"):
        describe_request(
            VCR_TASK, regions_from_result(TWO_BOXES, REASONING), REASONING, Prompts(), only_region_id="r1"
        )


def test_reasoning_task_without_its_question_is_an_error():
    task = {"id": 22, "data": {"image": "/data/upload/3/vcr.jpg"}}
    with pytest.raises(ValueError, match="task 22 has no question under 'question' in its data"):
        describe_request(task, [], REASONING, Prompts())


def test_task_without_its_image_is_an_error():
    with pytest.raises(ValueError, match="task 5 has no image URL under 'image' in its data"):
        describe_request({"id": 5, "data": {"img": "x.jpg"}}, [], CAPTION, Prompts())


def test_a_region_qa_task_without_typed_questions_has_nothing_to_ask():
    assert (
        describe_request(
            TASK, regions_from_result(TWO_BOXES, REGION_QA), REGION_QA, Prompts(), source_result=TWO_BOXES
        )
        is None
    )
