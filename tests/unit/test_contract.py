"""roi_contract: the typed data every process agrees on, and the one-line errors that name a problem."""

from __future__ import annotations

import json

import pytest

from roi_contract.describe import MAX_NEW_TOKENS_LIMIT, MAX_QUESTION_CHARS, MAX_URL_CHARS, DescribeRequest
from roi_contract.project import Controls, ProjectSettings, Prompts
from roi_contract.records import TrainingRecord, dataset_digest
from roi_contract.validation import MAX_PROBLEMS, ContractError, parse


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


def with_region(box) -> dict:
    return request(regions=[{"id": "r1", "box": box}, {"id": "r2", "box": [0.5, 0.5, 0.9, 0.9]}])


def describe(data) -> DescribeRequest:
    return parse(DescribeRequest, data, "describe request")


# --- the describe job ----------------------------------------------------------------------------------


def test_a_request_resolves_each_questions_regions_in_its_own_order():
    parsed = describe(request())

    assert (parsed.image.url, parsed.image.task_id, parsed.max_new_tokens) == ("scene.png", 17, 8)
    assert [parsed.boxes_of(q) for q in parsed.questions] == [
        [[0.1, 0.2, 0.45, 0.6]],
        [[0.5, 0.5, 0.9, 0.9], [0.1, 0.2, 0.45, 0.6]],  # <region1> is r2 here
    ]
    without_limit = {k: v for k, v in request().items() if k != "max_new_tokens"}
    assert describe(without_limit).max_new_tokens == 48


def test_boxes_within_the_rounding_tolerance_are_clipped_to_the_image():
    parsed = describe(with_region([-0.0005, 0.2, 1.0004, 0.7]))
    assert parsed.regions[0].box == [0.0, 0.2, 1.0, 0.7]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            ["not", "an", "object"],
            "Input should be a valid dictionary or instance of DescribeRequest (got list)",
        ),
        (request(image=None), "image: Input should be a valid dictionary"),
        (request(image={"url": " "}), "image.url: String should have at least 1 character"),
        (request(image={"url": "x" * (MAX_URL_CHARS + 1)}), f"at most {MAX_URL_CHARS} characters"),
        (request(image={"url": "a.png", "task_id": "17"}), "image.task_id: Input should be a valid integer"),
        ({k: v for k, v in request().items() if k != "regions"}, "regions: Field required"),
        (request(questions={}), "questions: Input should be a valid list"),
        (request(questions=[]), "questions: List should have at least 1 item"),
        (with_region([0.4, 0.2, 0.4, 0.7]), "regions.0.box: the box has zero area"),
        (with_region([0.1, 0.2, 0.05, 0.7]), "has zero area"),
        (with_region([0.1, 0.2, 1.5, 0.7]), "lies outside the image"),
        (with_region([0.1, 0.2, 0.5]), "regions.0.box: List should have at least 4 items"),
        (with_region([0.1, 0.2, True, 0.7]), "regions.0.box.2: Input should be a valid number"),
        (with_region([0.1, 0.2, float("nan"), 0.7]), "regions.0.box.2: Input should be a finite number"),
        (with_region([0.1, 0.2, float("inf"), 0.7]), "Input should be a finite number"),
        (with_region([0.1, 0.2, 1e308, 0.7]), "lies outside the image"),
        (request(regions=[{"id": "r1", "box": [0, 0, 1, 1]}] * 2), "region id 'r1' appears twice"),
        (request(regions=[{"box": [0, 0, 1, 1]}]), "regions.0.id: Field required"),
        (
            request(questions=[{"id": "q", "text": "What is <region1>?", "regions": ["r9"]}]),
            "question 'q' refers to region 'r9', which the request does not have ('r1', 'r2')",
        ),
        (
            request(questions=[{"id": "q", "text": "Is <region2> red?", "regions": ["r1"]}]),
            "question 'q' mentions <region2>, but lists 1 region(s)",
        ),
        (
            request(questions=[{"id": "q", "text": "What is <region1>?", "regions": ["r1", "r2"]}]),
            "question 'q' lists region 'r2' but never mentions it as <region2>",
        ),
        (
            request(questions=[{"id": "q", "text": "  ", "regions": []}]),
            "questions.0.text: the text is blank",
        ),
        (
            request(questions=[{"id": "q", "text": "x" * (MAX_QUESTION_CHARS + 1), "regions": []}]),
            f"questions.0.text: String should have at most {MAX_QUESTION_CHARS} characters",
        ),
        (
            request(questions=[{"id": "q", "text": "x", "regions": "r1"}]),
            "questions.0.regions: Input should be a valid list",
        ),
        (
            request(questions=[{"id": "q", "text": "Is <region1> red?", "regions": ["r1"]}] * 2),
            "question id 'q' appears twice",
        ),
        (request(max_new_tokens=0), "max_new_tokens: Input should be greater than or equal to 1"),
        (request(max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1), f"less than or equal to {MAX_NEW_TOKENS_LIMIT}"),
        (request(max_new_tokens=8.0), "max_new_tokens: Input should be a valid integer"),
        (
            request(extra="field"),
            "extra: unknown field (known: image, regions, questions, max_new_tokens, project)",
        ),
    ],
)
def test_a_bad_request_names_its_problem(bad, message):
    with pytest.raises(ContractError) as error:
        describe(bad)
    assert message in str(error.value)
    assert str(error.value).startswith("describe request: ")


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("/data/upload/3/a.png", True),
        ("/data/local-files/?d=imgs/a.png", True),
        ("https://images.example.com/a.png", True),
        ("s3://bucket/key.png", True),
        ("gs://bucket/key.png", True),
        ("scene.png", True),
        ("data:image/png;base64," + "A" * 100, False),
        ("javascript:alert(1)", False),
        ("ftp://files.example.com/a.png", False),
        ("http://a\\@b/c.png", False),
        ("/data/upload/a.png\x00", False),
    ],
)
def test_an_image_travels_by_reference_never_inline(url, accepted):
    data = request(image={"url": url})
    if accepted:
        assert describe(data).image.url == url
    else:
        with pytest.raises(ContractError, match=r"image\.url"):
            describe(data)


def test_an_error_names_at_most_a_few_problems_and_shows_values_shortly():
    many = request(regions=[{"id": f"r{i}", "box": "x" * 500} for i in range(20)])

    with pytest.raises(ContractError) as error:
        describe(many)

    message = str(error.value)
    assert message.count("Input should be a valid list") == MAX_PROBLEMS
    assert "and 15 more" in message
    assert len(message) < 1500


# --- project settings ----------------------------------------------------------------------------------


def test_extra_params_are_read_and_checked():
    settings = ProjectSettings.from_extra_params(
        '{"prompts": {"caption": "Name <region1>."}, "controls": {"answer": "caption"}, "train_every": 0}'
    )

    assert settings.prompts == Prompts(caption="Name <region1>.")
    assert settings.controls == Controls(answer="caption")
    assert settings.controls.named() == {"answer": "caption"}
    assert settings.train_every == 0
    assert (
        ProjectSettings.from_extra_params(None) == ProjectSettings.from_extra_params("") == ProjectSettings()
    )


def test_settings_survive_a_round_trip_through_json():
    settings = ProjectSettings.from_extra_params({"train": {"stage": "lora", "steps": 50}, "train_every": 5})

    again = ProjectSettings.model_validate(json.loads(json.dumps(settings.model_dump(mode="json"))))

    assert again == settings
    assert again.train.given() == {"stage": "lora", "steps": 50}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("{oops", "extra_params: not valid JSON"),
        ([1], "extra_params: Input should be a valid dictionary or instance of ProjectSettings (got list)"),
        ({"train_every": True}, "extra_params: train_every: Input should be a valid integer"),
        ({"train_every": -1}, "train_every: Input should be greater than or equal to 0"),
        ({"trian": {}}, "extra_params: trian: unknown field (known: prompts, controls, train_every, train)"),
        (
            {"controls": {"answr": "caption"}},
            "controls.answr: unknown field (known: image, rectangle, question, answer)",
        ),
        ({"controls": "caption"}, "controls: Input should be a valid dictionary"),
        (
            {"prompts": {"caption": "Describe the object."}},
            "prompts.caption: the prompt must mention <region1>",
        ),
        (
            {"prompts": {"summary": "<region1>"}},
            "prompts.summary: unknown field (known: caption, classification)",
        ),
        ({"prompts": ["Describe <region1>."]}, "prompts: Input should be a valid dictionary"),
        (
            {"train": {"stage": "everything"}},
            "train.stage: Input should be 'region', 'projector', 'lora' or 'full'",
        ),
        ({"train": {"steps": 0}}, "train.steps: Input should be greater than 0"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate: Input should be a valid number"),
        ("[" * 100_000, "extra_params: longer than"),
    ],
)
def test_bad_extra_params_name_the_problem(extra, message):
    with pytest.raises(ContractError) as error:
        ProjectSettings.from_extra_params(extra)
    assert message in str(error.value)


def test_default_prompts_mention_region1_and_list_the_choices():
    prompts = Prompts()
    assert prompts.caption == "Describe <region1> briefly."
    assert prompts.classification_text(("Cat", "Dog")) == "What is <region1>? Answer with one of: Cat, Dog."
    other_braces = Prompts(classification="Label <region1> {strictly}: {choices}")
    assert other_braces.classification_text(("A",)) == "Label <region1> {strictly}: A"


# --- training records ----------------------------------------------------------------------------------


RECORD = {
    "id": "ls:3:17:42",
    "image": "images/5f2c9a.jpg",
    "width": 800,
    "height": 600,
    "regions": [[80, 120, 360, 360]],
    "conversations": [
        {"from": "human", "value": "Describe <region1> briefly.", "kind": "caption"},
        {"from": "gpt", "value": "a large red circle", "source": {"origin": "prediction"}},
    ],
    "source": {"project": 3, "task": 17, "annotation": 42},
}


def test_a_record_of_the_design_document_is_valid():
    record = parse(TrainingRecord, RECORD, "record")
    assert record.conversations[1].speaker == "gpt"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"regions": [[80, 120, 900, 360]]}, "lies outside the 800x600 image"),
        ({"regions": [[80, 120, 80, 360]]}, "a pixel box needs 0 <= x1 < x2"),
        ({"width": 0}, "width: Input should be greater than 0"),
        ({"conversations": RECORD["conversations"][:1]}, "conversations: List should have at least 2 items"),
        ({"conversations": RECORD["conversations"][::-1]}, "must alternate human, gpt"),
        ({"image": ""}, "image: String should have at least 1 character"),
    ],
)
def test_a_bad_record_names_its_problem(change, message):
    with pytest.raises(ContractError, match=message):
        parse(TrainingRecord, {**RECORD, **change}, "record")


def test_the_dataset_digest_is_the_sha256_of_the_file():
    assert dataset_digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
