"""Label Studio results the backend reads, shared by the tests of backend.regions, describe_jobs and predictions."""

from pathlib import Path

from backend.labeling import scheme_from_config

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


TWO_BOXES = [rectangle("r1", 10, 20, 35, 40), rectangle("r2", 50, 50, 25, 25)]
THREE_BOXES = [*TWO_BOXES, rectangle("r3", 0, 0, 50, 50)]
VCR_TASK = {
    "id": 21,
    "data": {"image": "/data/upload/3/vcr.jpg", "question": "Why is <region2> looking at <region1>?"},
}
