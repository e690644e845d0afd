"""backend.export on the region shapes and export files real projects have (issue 17, part 5).

Fixtures are shaped like Label Studio 1.23.2's full JSON export: a config with two images, the OCR
template (Rectangle, Polygon, Labels and a per-region transcription), brush masks, keypoints, a second
rectangle control, two tasks sharing an annotation id (as LS's own test fixture
image_urls_with_bboxes_gt.json has), a JSON-MIN file. tests/e2e/test_export_label_studio.py makes the
two-image and polygon cases through a real Label Studio.
"""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import encode_rle

from backend.export import check_report, convert_tasks
from backend.export_images import StoredImage
from backend.labeling import scheme_from_config
from roi_contract.project import Prompts
from roi_contract.records import TrainingRecord
from roi_contract.validation import parse

PROJECT = 4
IMAGE = StoredImage("images/" + "ab" * 32 + ".png", 200, 100)
OTHER = StoredImage("images/" + "cd" * 32 + ".png", 200, 100)

TWO_IMAGES = scheme_from_config(
    """<View>
  <Image name="left" value="$left"/>
  <Image name="right" value="$right"/>
  <RectangleLabels name="label" toName="left,right"><Label value="Object"/></RectangleLabels>
  <TextArea name="caption" toName="left,right" perRegion="true"/>
</View>"""
)
OCR = scheme_from_config(
    """<View>
  <Image name="image" value="$ocr"/>
  <Labels name="label" toName="image"><Label value="Text"/><Label value="Handwriting"/></Labels>
  <Rectangle name="bbox" toName="image"/>
  <Polygon name="poly" toName="image"/>
  <BrushLabels name="brush" toName="image"><Label value="Ink"/></BrushLabels>
  <KeyPointLabels name="point" toName="image"><Label value="Dot"/></KeyPointLabels>
  <Rectangle name="second" toName="image"/>
  <TextArea name="transcription" toName="image" perRegion="true" editable="true"/>
</View>"""
)


def item(region_id, from_name, item_type, value, *, to_name="image", size=(200, 100)):
    return {
        "id": region_id,
        "from_name": from_name,
        "to_name": to_name,
        "type": item_type,
        "original_width": size[0],
        "original_height": size[1],
        "image_rotation": 0,
        "value": value,
        "origin": "manual",
    }


def box(region_id, x, y, w, h, *, from_name="bbox", item_type="rectangle", to_name="image", rotation=0):
    value = {"x": x, "y": y, "width": w, "height": h, "rotation": rotation}
    if item_type == "rectanglelabels":
        value["rectanglelabels"] = ["Object"]
    return item(region_id, from_name, item_type, value, to_name=to_name)


def text(region_id, words, *, from_name="transcription", to_name="image"):
    return item(region_id, from_name, "textarea", {"text": [words]}, to_name=to_name)


def annotation(annotation_id, result, *, task=1, ground_truth=False):
    return {
        "id": annotation_id,
        "completed_by": 1,
        "result": result,
        "was_cancelled": False,
        "ground_truth": ground_truth,
        "created_at": "2026-01-02T09:59:00.000000Z",
        "updated_at": "2026-01-02T10:00:00.000000Z",
        "lead_time": 3.0,
        "prediction": {},
        "result_count": 0,
        "task": task,
        "parent_prediction": None,
        "parent_annotation": None,
    }


def task(task_id, annotations, data):
    return {
        "id": task_id,
        "annotations": annotations,
        "drafts": [],
        "predictions": [],
        "data": data,
        "meta": {},
    }


def convert(tasks, scheme, images):
    conversion = convert_tasks(tasks, scheme, Prompts(), PROJECT, images)
    check_report(conversion.report)
    for record in conversion.records:
        parse(TrainingRecord, record, "record")
    return conversion


def test_a_box_drawn_on_the_second_image_is_not_a_region_of_the_first():
    result = [
        box("a", 0, 0, 50, 50, from_name="label", item_type="rectanglelabels", to_name="left"),
        text("a", "a box on the left", from_name="caption", to_name="left"),
        box("b", 50, 50, 50, 50, from_name="label", item_type="rectanglelabels", to_name="right"),
        text("b", "a box on the right", from_name="caption", to_name="right"),
    ]
    data = {"left": "/data/upload/4/left.png", "right": "/data/upload/4/right.png"}
    conversion = convert([task(1, [annotation(7, result)], data)], TWO_IMAGES, {data["left"]: IMAGE})
    [record] = conversion.records
    assert record["image"] == IMAGE.path
    assert record["regions"] == [[0, 0, 100, 50]]
    assert [turn["value"] for turn in record["conversations"]] == [
        "Describe <region1> briefly.",
        "a box on the left",
    ]
    assert conversion.report["regions_skipped"] == {"on_other_image": ["7:b"]}
    assert (conversion.report["regions_total"], conversion.report["regions_exported"]) == (2, 1)


def test_polygons_and_brush_masks_become_their_bounding_box_with_the_mask_kept():
    mask = np.zeros((50, 100, 4), dtype=np.uint8)  # a brush mask at half the fetched resolution
    mask[10:20, 30:60, 3] = 255
    rle = [int(byte) for byte in encode_rle(mask.ravel())]
    result = [
        box("r", 10, 10, 20, 20),
        text("r", "STOP"),
        item("p", "poly", "polygon", {"points": [[50, 10], [90, 20], [70, 80]], "closed": True}),
        text("p", "EXIT"),
        item(
            "m", "brush", "brushlabels", {"format": "rle", "rle": rle, "brushlabels": ["Ink"]}, size=(100, 50)
        ),
        text("m", "a signature"),
    ]
    conversion = convert([task(1, [annotation(8, result)], {"ocr": "/img.png"})], OCR, {"/img.png": IMAGE})
    [record] = conversion.records
    assert record["regions"] == [[20, 10, 60, 30], [100, 10, 180, 80], [60, 20, 120, 40]]
    assert record["masks"][0] is None
    assert record["masks"][1] == {"type": "polygon", "points": [[100.0, 10.0], [180.0, 20.0], [140.0, 80.0]]}
    assert record["masks"][2] == {"type": "brush", "format": "rle", "rle": rle, "width": 100, "height": 50}
    answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
    assert answers == ["STOP", "EXIT", "a signature"]
    assert conversion.report["regions_skipped"] == {}
    assert conversion.report["regions_exported"] == 3


def test_a_box_only_record_has_no_masks_field():
    result = [box("r", 10, 10, 20, 20), text("r", "STOP")]
    conversion = convert([task(1, [annotation(8, result)], {"ocr": "/img.png"})], OCR, {"/img.png": IMAGE})
    assert "masks" not in conversion.records[0]


def test_keypoints_other_controls_and_broken_shapes_are_counted_by_reason():
    result = [
        box("r", 10, 10, 20, 20),
        text("r", "kept"),
        item("k", "point", "keypointlabels", {"x": 5, "y": 5, "width": 1, "keypointlabels": ["Dot"]}),
        text("k", "a dot"),
        box("s", 50, 50, 10, 10, from_name="second"),
        text("s", "a box of the second control"),
        item("p", "poly", "polygon", {"points": [[1, 1], [2, 2]]}),
        text("p", "two points"),
        item("m", "brush", "brushlabels", {"format": "rle", "rle": [1, 2, 3]}, size=(100, 50)),
        text("m", "garbage"),
    ]
    conversion = convert([task(1, [annotation(9, result)], {"ocr": "/img.png"})], OCR, {"/img.png": IMAGE})
    assert conversion.records[0]["regions"] == [[20, 10, 60, 30]]
    assert conversion.report["regions_skipped"] == {
        "unsupported_keypointlabels": ["9:k"],
        "rectangle_of_other_control": ["9:s"],
        "invalid_polygon": ["9:p"],
        "invalid_mask": ["9:m"],
    }
    assert conversion.report["regions_total"] == 5


def test_an_annotation_with_only_keypoints_is_left_out_with_its_regions():
    result = [item("k", "point", "keypointlabels", {"x": 5, "y": 5, "width": 1, "keypointlabels": ["Dot"]})]
    conversion = convert([task(1, [annotation(9, result)], {"ocr": "/img.png"})], OCR, {"/img.png": IMAGE})
    assert conversion.records == []
    assert conversion.report["annotations_skipped"] == {"no_rectangles": [9]}
    assert conversion.report["regions_skipped"] == {"annotation_no_rectangles": ["9:k"]}


def test_two_tasks_sharing_an_annotation_id_are_reported_apart():
    # As in Label Studio's own fixture image_urls_with_bboxes_gt.json: two tasks, annotation 618584 in both,
    # boxes without text (an object-detection project), so both are left out.
    def detection(task_id, x):
        rectangle = box("UKz", x, x, 2, 2, from_name="label", item_type="rectanglelabels", to_name="image")
        return task(
            task_id,
            [annotation(618584, [rectangle], task=task_id, ground_truth=True)],
            {"image": f"/{task_id}.jpg"},
        )

    scheme = scheme_from_config(
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
        '<Label value="Cat"/></RectangleLabels><TextArea name="caption" toName="image" perRegion="true"/></View>'
    )
    images = {"/282278.jpg": IMAGE, "/282279.jpg": OTHER}
    conversion = convert([detection(282279, 2), detection(282278, 1)], scheme, images)
    assert conversion.records == []
    assert conversion.report["annotations_skipped"] == {
        "no_answered_regions": ["282278/618584", "282279/618584"]
    }
    assert conversion.report["regions_skipped"] == {"no_text": ["282278/618584:UKz", "282279/618584:UKz"]}


def test_a_rotated_box_on_an_image_of_another_aspect_ratio_is_counted_not_reshaped():
    tilted = {**box("t", 50, 10, 20, 10, rotation=30), "original_width": 100, "original_height": 100}
    upright = {**box("u", 10, 10, 20, 20), "original_width": 100, "original_height": 100}
    result = [tilted, text("t", "tilted"), upright, text("u", "upright")]
    conversion = convert([task(1, [annotation(5, result)], {"ocr": "/img.png"})], OCR, {"/img.png": IMAGE})
    assert conversion.records[0]["regions"] == [[20, 10, 60, 30]]
    assert conversion.report["regions_skipped"] == {"rotated_box_aspect_mismatch": ["5:t"]}


def test_a_json_min_export_is_refused_by_name():
    json_min = [
        {
            "id": 1,
            "ocr": "/img.png",
            "transcription": ["STOP"],
            "annotator": 1,
            "annotation_id": 8,
            "created_at": "2026-01-02T09:59:00.000000Z",
            "updated_at": "2026-01-02T10:00:00.000000Z",
            "lead_time": 3.0,
        },
        {"id": 1, "ocr": "/img.png", "transcription": ["GO"], "annotator": 2, "annotation_id": 9},
    ]
    for tasks in (
        json_min,
        [{"id": 2, "ocr": "/other.png"}],
    ):  # an unannotated task in JSON-MIN has no "data"
        with pytest.raises(ValueError, match="JSON-MIN"):
            convert_tasks(tasks, OCR, Prompts(), PROJECT, {})
