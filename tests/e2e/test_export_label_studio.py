"""backend.export against a real Label Studio 1.23.2: its JSON export, its local files, its predictions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from backend.dataset import DATA_FILE, MANIFEST_FILE, REPORT_FILE, export_project
from backend.ls_client import LabelStudioClient
from backend.settings import Settings
from devstack.label_studio import LabelStudio

REPO_ROOT = Path(__file__).resolve().parents[2]


def box_and_caption(
    region_id: str, box: tuple[float, float, float, float], text: str, origin: str
) -> list[dict]:
    """A rectangle and its caption, tied by their shared id, as the labeling UI saves them."""
    x, y, width, height = box
    geometry = {"x": x, "y": y, "width": width, "height": height, "rotation": 0}
    common = {
        "id": region_id,
        "to_name": "image",
        "original_width": 80,
        "original_height": 60,
        "origin": origin,
    }
    return [
        {
            **common,
            "from_name": "label",
            "type": "rectanglelabels",
            "value": {**geometry, "rectanglelabels": ["Object"]},
        },
        {**common, "from_name": "caption", "type": "textarea", "value": {**geometry, "text": [text]}},
    ]


@pytest.fixture(scope="module")
def project(label_studio: LabelStudio, ls_client: LabelStudioClient) -> int:
    folder = label_studio.files_root / "export-images"
    folder.mkdir(exist_ok=True)
    # Stored 80x60 with EXIF orientation 6: Label Studio shows it, and the boxes refer to it, as 60x80.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 60), (200, 30, 30)).save(folder / "portrait.jpg", exif=exif)
    Image.new("RGB", (40, 30), (30, 200, 30)).save(folder / "green.png")
    project = ls_client.create_project(
        "export checks", (REPO_ROOT / "labeling_configs" / "region_captioning.xml").read_text()
    )
    ls_client.add_local_storage(project, folder, "export images")
    return project


def test_a_project_export_becomes_records_with_provenance(
    label_studio: LabelStudio, ls_client: LabelStudioClient, project: int, tmp_path: Path
) -> None:
    first_guess = {
        "model_version": "v1",
        "result": box_and_caption("r1", (10, 20, 50, 25), "a red square", "prediction"),
    }
    portrait, green = ls_client.import_tasks(
        project,
        [
            {
                "data": {"image": "/data/local-files/?d=export-images/portrait.jpg"},
                "predictions": [first_guess],
            },
            {"data": {"image": "/data/local-files/?d=export-images/green.png"}},
        ],
    )
    [parent] = [prediction["id"] for prediction in ls_client.predictions(portrait)]
    # A newer prediction: the one LS records as viewed, while the annotation came from the first.
    ls_client.create_prediction(
        portrait,
        box_and_caption("r1", (10, 20, 50, 25), "a red box", "prediction"),
        score=0.5,
        model_version="v2",
    )

    edited = box_and_caption("r1", (10, 20, 50, 25), "a red bar", "prediction-changed")
    edited_id = ls_client.create_annotation(portrait, edited, parent_prediction=parent)
    skipped_id = ls_client.create_annotation(portrait, [], was_cancelled=True)
    other = ls_client.create_annotation(green, box_and_caption("g1", (0, 0, 50, 50), "green", "manual"))
    truth = ls_client.create_annotation(
        green, box_and_caption("g1", (0, 0, 50, 100), "a green field", "manual")
    )
    ls_client.update_annotation(
        truth, box_and_caption("g1", (0, 0, 50, 100), "a green field", "manual"), ground_truth=True
    )

    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    report = export_project(ls_client, project, tmp_path / "a", settings)

    records = [json.loads(line) for line in (tmp_path / "a" / DATA_FILE).read_text().splitlines()]
    assert [(r["id"], r["width"], r["height"], r["regions"]) for r in records] == [
        (f"ls:{project}:{portrait}:{edited_id}", 60, 80, [[6, 16, 36, 36]]),
        (f"ls:{project}:{green}:{truth}", 40, 30, [[0, 0, 20, 30]]),
    ]
    assert records[0]["conversations"] == [
        {"from": "human", "value": "Describe <region1> briefly.", "kind": "caption"},
        {
            "from": "gpt",
            "value": "a red bar",
            "source": {"region": "r1", "origin": "prediction-changed", "suggestion": "a red square"},
        },
    ]
    assert records[0]["source"]["model_version"] == "v1"
    assert records[0]["source"]["annotator"] == records[1]["source"]["annotator"] is not None
    assert records[1]["source"]["ground_truth"] is True
    stored = tmp_path / "a" / records[0]["image"]
    assert records[0]["image"] == f"images/{hashlib.sha256(stored.read_bytes()).hexdigest()}.jpg"

    assert report["annotations_skipped"] == {
        "cancelled": [skipped_id],
        "superseded_by_ground_truth": [other],
    }
    assert report["regions_skipped"] == {"annotation_superseded_by_ground_truth": [f"{other}:g1"]}
    assert (report["annotations_total"], report["regions_total"], report["records"], report["images"]) == (
        4,
        3,
        2,
        2,
    )
    assert report["by_origin"] == {"prediction": 0, "prediction-changed": 1, "manual": 1}
    assert json.loads((tmp_path / "a" / REPORT_FILE).read_text()) == report

    # A second export of the unchanged project gives the same bytes; only the manifest's time differs.
    export_project(ls_client, project, tmp_path / "b", settings)
    for name in (DATA_FILE, REPORT_FILE, records[0]["image"], records[1]["image"]):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    manifests = [json.loads((tmp_path / side / MANIFEST_FILE).read_text()) for side in "ab"]
    for manifest in manifests:
        del manifest["exported_at"]
    assert manifests[0] == manifests[1]


TWO_IMAGES_CONFIG = """<View>
  <Image name="left" value="$left"/>
  <Image name="right" value="$right"/>
  <RectangleLabels name="label" toName="left,right"><Label value="Object"/></RectangleLabels>
  <TextArea name="caption" toName="left,right" perRegion="true" editable="true"/>
</View>"""

# Label Studio's OCR template, plus the tools a real project adds to it.
OCR_CONFIG = """<View>
  <Image name="image" value="$ocr"/>
  <Labels name="label" toName="image"><Label value="Text"/><Label value="Handwriting"/></Labels>
  <Rectangle name="bbox" toName="image" strokeWidth="3"/>
  <Polygon name="poly" toName="image" strokeWidth="3"/>
  <KeyPointLabels name="point" toName="image"><Label value="Dot"/></KeyPointLabels>
  <TextArea name="transcription" toName="image" editable="true" perRegion="true" required="true"
            maxSubmissions="1" rows="5" placeholder="Recognized Text" displayMode="region-list"/>
</View>"""


def _item(region_id: str, from_name: str, item_type: str, value: dict, to_name: str, size=(40, 30)) -> dict:
    return {
        "id": region_id,
        "from_name": from_name,
        "to_name": to_name,
        "type": item_type,
        "original_width": size[0],
        "original_height": size[1],
        "image_rotation": 0,
        "origin": "manual",
        "value": value,
    }


def _export_of(
    label_studio: LabelStudio, ls_client: LabelStudioClient, config: str, data: dict, result: list, out: Path
) -> tuple[list[dict], dict]:
    folder = label_studio.files_root / "shapes"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), (30, 30, 200)).save(folder / "blue.png")
    Image.new("RGB", (40, 30), (200, 200, 30)).save(folder / "yellow.png")
    project = ls_client.create_project(f"shapes {out.name}", config)
    ls_client.add_local_storage(project, folder, f"shapes {out.name}")
    [task] = ls_client.import_tasks(project, [{"data": data}])
    ls_client.create_annotation(task, result)
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    report = export_project(ls_client, project, out, settings)
    return [json.loads(line) for line in (out / DATA_FILE).read_text().splitlines()], report


def test_a_box_on_the_second_image_of_a_real_export_stays_off_the_first(
    label_studio: LabelStudio, ls_client: LabelStudioClient, tmp_path: Path
) -> None:
    geometry = {"x": 0, "y": 0, "width": 50, "height": 50, "rotation": 0}
    result = []
    for region_id, image, words in (("L", "left", "a box on the left"), ("R", "right", "a box on the right")):
        result += [
            _item(region_id, "label", "rectanglelabels", {**geometry, "rectanglelabels": ["Object"]}, image),
            _item(region_id, "caption", "textarea", {**geometry, "text": [words]}, image),
        ]
    data = {"left": "/data/local-files/?d=shapes/blue.png", "right": "/data/local-files/?d=shapes/yellow.png"}
    records, report = _export_of(label_studio, ls_client, TWO_IMAGES_CONFIG, data, result, tmp_path / "two")
    [record] = records
    assert record["regions"] == [[0, 0, 20, 15]]
    assert record["conversations"][1]["value"] == "a box on the left"
    assert report["regions_skipped"] == {"on_other_image": [f"{record['source']['annotation']}:R"]}


def test_polygon_transcriptions_of_the_ocr_template_are_exported_with_their_shape(
    label_studio: LabelStudio, ls_client: LabelStudioClient, tmp_path: Path
) -> None:
    rectangle = {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 0}
    result = [
        _item("b1", "bbox", "rectangle", rectangle, "image"),
        _item("b1", "label", "labels", {**rectangle, "labels": ["Text"]}, "image"),
        _item("b1", "transcription", "textarea", {**rectangle, "text": ["STOP"]}, "image"),
        _item("p1", "poly", "polygon", {"points": [[50, 10], [90, 20], [70, 80]], "closed": True}, "image"),
        _item(
            "p1",
            "transcription",
            "textarea",
            {"points": [[50, 10], [90, 20], [70, 80]], "text": ["EXIT"]},
            "image",
        ),
        _item(
            "k1", "point", "keypointlabels", {"x": 5, "y": 5, "width": 1, "keypointlabels": ["Dot"]}, "image"
        ),
    ]
    data = {"ocr": "/data/local-files/?d=shapes/blue.png"}
    records, report = _export_of(label_studio, ls_client, OCR_CONFIG, data, result, tmp_path / "ocr")
    [record] = records
    assert record["regions"] == [[4, 3, 12, 9], [20, 3, 36, 24]]
    assert record["masks"] == [None, {"type": "polygon", "points": [[20.0, 3.0], [36.0, 6.0], [28.0, 24.0]]}]
    assert [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"] == ["STOP", "EXIT"]
    assert report["regions_skipped"] == {
        "unsupported_keypointlabels": [f"{record['source']['annotation']}:k1"]
    }
    assert (report["regions_total"], report["regions_exported"]) == (3, 2)


def test_real_exports_json_min_refused_shared_ids_reported_and_aspect_mismatch_counted(
    label_studio: LabelStudio, ls_client: LabelStudioClient, tmp_path: Path
) -> None:
    rotated = {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 30}
    result = [
        # Label Studio says 80x80; the image it serves is 40x30: the rotated box is counted, not reshaped.
        _item("t1", "bbox", "rectangle", rotated, "image", size=(80, 80)),
        _item("t1", "transcription", "textarea", {**rotated, "text": ["TILTED"]}, "image", size=(80, 80)),
        _item("u1", "bbox", "rectangle", {**rotated, "rotation": 0}, "image", size=(80, 80)),
        _item("u1", "transcription", "textarea", {**rotated, "rotation": 0, "text": ["UPRIGHT"]}, "image"),
    ]
    data = {"ocr": "/data/local-files/?d=shapes/yellow.png"}
    records, report = _export_of(label_studio, ls_client, OCR_CONFIG, data, result, tmp_path / "aspect")
    [record] = records
    assert record["regions"] == [[4, 3, 12, 9]]
    assert report["regions_skipped"] == {
        "rotated_box_aspect_mismatch": [f"{record['source']['annotation']}:t1"]
    }
    project = record["source"]["project"]

    # The same project exported by Label Studio as JSON-MIN: refused by name.
    json_min = ls_client.sdk.projects.exports.download_sync(project, export_type="JSON_MIN")
    tasks = json.loads(b"".join(json_min))
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    with pytest.raises(ValueError, match="JSON-MIN"):
        export_project(ls_client, project, tmp_path / "min", settings, exported_tasks=tasks)

    # Its full export with the task duplicated under another id (as Label Studio's own fixture
    # image_urls_with_bboxes_gt.json has it): both are reported, apart.
    [task] = ls_client.export_json(project)
    twin = {**task, "id": task["id"] + 1000}
    report = export_project(ls_client, project, tmp_path / "twins", settings, exported_tasks=[task, twin])
    annotation = task["annotations"][0]["id"]
    assert report["regions_skipped"] == {
        "rotated_box_aspect_mismatch": [
            f"{task['id']}/{annotation}:t1",
            f"{task['id'] + 1000}/{annotation}:t1",
        ]
    }
    assert report["records"] == 2
