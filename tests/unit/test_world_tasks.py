"""devstack.world_tasks: the synthetic world as Label Studio tasks with its boxes as predictions."""

from __future__ import annotations

import json

import pytest

from devstack.world_tasks import write_tasks
from roi_model.synthetic import generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, 6, 11)
    return out, [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def test_tasks_json_holds_percent_boxes_of_the_displayed_image(world, tmp_path):
    out, records = world
    tasks = json.loads(write_tasks(out).read_text())
    assert len(tasks) == len(records)
    ids = []
    for task, record in zip(tasks, records, strict=True):
        assert task["data"]["image"] == "/data/local-files/?d=" + record["image"]
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "synthetic-boxes"
        assert len(prediction["result"]) == len(record["regions"])
        for item, (x1, y1, x2, y2) in zip(prediction["result"], record["regions"], strict=True):
            ids.append(item["id"])
            assert (item["from_name"], item["to_name"], item["type"]) == ("label", "image", "rectanglelabels")
            assert (item["original_width"], item["original_height"]) == (record["width"], record["height"])
            assert item["image_rotation"] == 0
            assert item["value"] == {
                "x": x1 / record["width"] * 100,
                "y": y1 / record["height"] * 100,
                "width": (x2 - x1) / record["width"] * 100,
                "height": (y2 - y1) / record["height"] * 100,
                "rotation": 0,
                "rectanglelabels": ["Object"],
            }
    assert len(ids) == len(set(ids))

    generate_world(tmp_path, 1, 3)
    path = write_tasks(
        tmp_path, url_prefix="/data/upload/", from_name="box", to_name="img", rectangle_label="Thing"
    )
    (task,) = json.loads(path.read_text())
    records = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    item = task["predictions"][0]["result"][0]
    assert task["data"]["image"] == "/data/upload/" + records[0]["image"]
    assert (item["from_name"], item["to_name"], item["value"]["rectanglelabels"]) == ("box", "img", ["Thing"])
