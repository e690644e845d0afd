"""The synthetic world as Label Studio tasks: each record's boxes as rectangle predictions.

roi_model.synthetic writes the world (images and data.jsonl) and knows nothing of Label Studio; the demo,
the end-to-end tests and the benchmarks import it into Label Studio through `write_tasks` (tasks.json next
to data.jsonl), and draw boxes in the browser with `label_studio_rectangle`.

    python -m devstack.world_tasks WORLD_DIR [--url-prefix /data/local-files/?d=world/]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

TASKS_FILE = "tasks.json"
BOXES_MODEL_VERSION = "synthetic-boxes"


def label_studio_rectangle(
    box: Sequence[float],
    width: int,
    height: int,
    region_id: str,
    *,
    from_name: str = "label",
    to_name: str = "image",
    rectangle_label: str = "Object",
) -> dict:
    """A pixel box [x1, y1, x2, y2] on a width x height image as a Label Studio rectangle result."""
    x1, y1, x2, y2 = box
    return {
        "id": region_id,
        "from_name": from_name,
        "to_name": to_name,
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": x1 / width * 100,
            "y": y1 / height * 100,
            "width": (x2 - x1) / width * 100,
            "height": (y2 - y1) / height * 100,
            "rotation": 0,
            "rectanglelabels": [rectangle_label],
        },
    }


def write_tasks(
    world: Path,
    *,
    url_prefix: str = "/data/local-files/?d=",
    from_name: str = "label",
    to_name: str = "image",
    rectangle_label: str = "Object",
) -> Path:
    """tasks.json in `world`: one task per record of its data.jsonl, image URL = url_prefix + image path."""
    world = Path(world)
    tasks = []
    for line in (world / "data.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        source = record["source"]
        result = [
            label_studio_rectangle(
                box,
                record["width"],
                record["height"],
                f"s{source['seed']}i{source['index']}r{k + 1}",
                from_name=from_name,
                to_name=to_name,
                rectangle_label=rectangle_label,
            )
            for k, box in enumerate(record["regions"])
        ]
        tasks.append(
            {
                "data": {"image": url_prefix + record["image"], "record_id": record["id"]},
                "predictions": [{"model_version": BOXES_MODEL_VERSION, "result": result}],
            }
        )
    path = world / TASKS_FILE
    path.write_text(json.dumps(tasks, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.world_tasks", description=write_tasks.__doc__)
    parser.add_argument("world", type=Path, help="a folder written by `roi-model synth`")
    parser.add_argument("--url-prefix", default="/data/local-files/?d=", help="prefix of the image URLs")
    args = parser.parse_args(argv)
    print(write_tasks(args.world, url_prefix=args.url_prefix))


if __name__ == "__main__":
    main()
