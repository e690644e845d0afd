"""backend.regions: Label Studio result items to regions, boxes normalized to the displayed image."""

import pytest
from ls_results import CAPTION, REASONING, REGION_QA, TASK, rectangle, textarea

from backend.regions import drawn_region, region_from_item, regions_from_result, task_regions

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
    with pytest.raises(ValueError, match=r"rectangle 'r1' value.width must be a number, got 'None'"):
        region_from_item(item)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"value": "x"}, "rectangle 'r1' has no 'value' object"),
        ({"value": {"x": "10", "y": 1, "width": 1, "height": 1}}, r"value\.x must be a number, got '10'"),
        ({"value": {"x": 10**400, "y": 1, "width": 1, "height": 1}}, r"value\.x must be a finite percentage"),
        ({"value": {"x": 1e308, "y": 1, "width": 1, "height": 1}}, r"value\.x must be a finite percentage"),
        ({"value": {"x": True, "y": 1, "width": 1, "height": 1}}, r"value\.x must be a number"),
        ({"original_width": "800"}, "original_width must be a positive pixel count"),
    ],
    ids=["value-not-object", "string", "400-digits", "huge", "bool", "size-string"],
)
def test_malformed_geometry_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        region_from_item({**rectangle("r1", 10, 10, 10, 10), **change})


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


def stamped(entry_id, region_id, **stamps):
    return {"id": entry_id, "result": [rectangle(region_id, 10, 10, 10, 10)], **stamps}


@pytest.mark.parametrize(
    ("annotations", "newest"),
    [
        (  # edited after the other was made: updated_at counts, not created_at or the id
            [
                stamped(
                    5, "made-later", created_at="2025-01-02T00:00:00Z", updated_at="2025-01-02T00:00:00Z"
                ),
                stamped(
                    3, "edited-later", created_at="2025-01-01T00:00:00Z", updated_at="2025-01-03T00:00:00Z"
                ),
            ],
            "edited-later",
        ),
        (  # without updated_at, created_at counts
            [
                stamped(1, "created", created_at="2025-01-03T00:00:00Z"),
                stamped(2, "updated", updated_at="2025-01-02T00:00:00Z"),
            ],
            "created",
        ),
        (  # the same time: the higher id is the newer
            [
                stamped(4, "id-4", updated_at="2025-01-02T00:00:00Z"),
                stamped(9, "id-9", updated_at="2025-01-02T00:00:00Z"),
            ],
            "id-9",
        ),
        (  # no time at all is older than any time
            [stamped(None, "no-time"), stamped(1, "timed", updated_at="2025-01-01T00:00:00Z")],
            "timed",
        ),
        (  # an id that is not a number (or is a boolean) is older than any id at the same time
            [
                stamped("a7", "text-id", updated_at="2025-01-01T00:00:00Z"),
                stamped(True, "bool-id", updated_at="2025-01-01T00:00:00Z"),
                stamped(None, "no-id", updated_at="2025-01-01T00:00:00Z"),
                stamped(1, "id-1", updated_at="2025-01-01T00:00:00Z"),
            ],
            "id-1",
        ),
    ],
    ids=["updated-at", "created-at", "id", "no-time", "odd-ids"],
)
def test_task_regions_come_from_the_newest_annotation(annotations, newest):
    regions, _ = task_regions({**TASK, "annotations": annotations}, CAPTION)
    assert [region.id for region in regions] == [newest]


def test_task_regions_pass_over_an_annotation_whose_result_is_not_a_list():
    annotations = [
        entry(1, "2025-01-01T10:00:00.000000Z", [rectangle("older", 10, 10, 10, 10)]),
        entry(2, "2025-01-02T10:00:00.000000Z", None),
    ]
    regions, result = task_regions({**TASK, "annotations": annotations}, CAPTION)
    assert [region.id for region in regions] == ["older"]
    assert result == annotations[0]["result"]


def test_a_box_with_only_one_side_of_the_image_size_is_taken_in_percent():
    item = rectangle("r1", 10, 20, 30, 40)
    del item["original_height"]

    assert region_from_item(item).box == (0.1, 0.2, 0.4, 0.6)


def test_a_flat_box_stays_flat():
    # A click without a drag draws a box of no height; turned or not, it is not given one.
    assert region_from_item(rectangle("r1", 10, 20, 25, 0)).box == (0.1, 0.2, 0.35, 0.2)
    assert region_from_item(rectangle("r2", 10, 20, 0, 25)).box == (0.1, 0.2, 0.1, 0.45)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": "y" * 50}, f"rectangle 'r1' value.x must be a number, got '{'y' * 40}'"),
        ({"x": 10**400}, f"rectangle 'r1' value.x must be a finite percentage, got {'1' + '0' * 39}"),
        ({"x": 1_000_001}, "rectangle 'r1' value.x must be a finite percentage, got 1000001"),
        ({"y": -1_000_000.5}, "rectangle 'r1' value.y must be a finite percentage, got -1000000.5"),
    ],
    ids=["long-string", "400-digits", "over-a-million", "under-minus-a-million"],
)
def test_geometry_refusals_word_for_word(change, message):
    item = rectangle("r1", 10, 10, 10, 10)
    item["value"] = {**item["value"], **change}

    with pytest.raises(ValueError) as refusal:
        region_from_item(item)
    assert str(refusal.value) == message


def test_geometry_up_to_a_million_percent_is_a_number():
    assert region_from_item(rectangle("r1", 1_000_000, -1_000_000, 10, 10)).box == (1.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (0, "rectangle 'r1' original_width must be a positive pixel count, got '0'"),
        (10**6, "rectangle 'r1' original_width must be a positive pixel count, got '1000000'"),
        (10**50, f"rectangle 'r1' original_width must be a positive pixel count, got '{'1' + '0' * 39}'"),
        ("800", "rectangle 'r1' original_width must be a positive pixel count, got '800'"),
    ],
)
def test_image_size_refusals_word_for_word(size, message):
    with pytest.raises(ValueError) as refusal:
        region_from_item({**rectangle("r1", 10, 10, 10, 10), "original_width": size})
    assert str(refusal.value) == message


def test_an_image_size_from_one_to_under_a_million_pixels_is_taken():
    for size in (1, 999_999):
        region = region_from_item({**rectangle("r1", 10, 10, 10, 10), "original_width": size})
        assert region.original_width == size


def test_a_region_qa_region_carries_its_question_and_not_its_answer():
    question = textarea("r1", "question", "What colour is it?")
    answer = textarea("r1", "answer", "red")  # LS lists the answer after the question

    [region] = regions_from_result([rectangle("r1", 10, 10, 10, 10), question, answer], REGION_QA)

    assert region.question_item == question


def test_only_region_qa_regions_carry_a_typed_question():
    # A reasoning scheme's question is a <Text>: an item named after it is no question typed into a box.
    crafted = textarea("r1", REASONING.question, "not a typed question")

    [region] = regions_from_result([rectangle("r1", 10, 10, 10, 10), crafted], REASONING)

    assert REASONING.question is not None and region.question_item is None


@pytest.mark.parametrize(
    ("region_id", "message"),
    [
        (None, "a rectangle has no 'id' (got 'None')"),
        ("", "a rectangle has no 'id' (got '')"),
        (True, "a rectangle has no 'id' (got 'True')"),
        (["r" * 50], f"a rectangle has no 'id' (got \"['{'r' * 38}\")"),
    ],
    ids=["missing", "empty", "bool", "list"],
)
def test_a_rectangle_needs_an_id_word_for_word(region_id, message):
    with pytest.raises(ValueError) as refusal:
        region_from_item({**rectangle("r1", 10, 10, 10, 10), "id": region_id})
    assert str(refusal.value) == message


def test_a_refusal_names_the_rectangle_by_the_first_80_characters_of_its_id():
    item = rectangle("b" * 100, 10, 10, 10, 10)
    item["value"] = {**item["value"], "rotation": "90"}

    with pytest.raises(ValueError) as refusal:
        region_from_item(item)
    assert str(refusal.value) == f"rectangle '{'b' * 80}' value.rotation must be a number, got '90'"


def test_labels_that_are_not_a_list_or_of_an_odd_type_are_no_labels():
    as_text = rectangle("r1", 10, 10, 10, 10)
    as_text["value"] = {**as_text["value"], "rectanglelabels": "Object"}
    odd_type = {**rectangle("r2", 10, 10, 10, 10), "type": ["rectanglelabels"]}

    assert region_from_item(as_text).labels == ()
    assert region_from_item(odd_type).labels == ()
    assert region_from_item(rectangle("r3", 10, 10, 10, 10, labels=("Object", "Car"))).labels == (
        "Object",
        "Car",
    )
