"""worker.jobs.prelabel_tasks end to end: a real Label Studio 1.23.2, a real worker process, a tiny model.

The tasks carry boxes an annotator drew (annotations without captions); the job must caption every box,
write one prediction per task and model version, list the tasks it could not predict with their reason,
and do nothing twice when it runs again.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from backend.ls_client import LabelStudioClient
from backend.predictions import TRUNCATED_MARK
from backend.queues import INTERACTIVE, PRELABEL, enqueue, wait_for_result
from devstack.label_studio import LabelStudio
from tests.integration.conftest import REPO_ROOT
from tests.integration.worker_harness import noise_image

CONFIG = (REPO_ROOT / "labeling_configs" / "region_captioning.xml").read_text()


def rectangle(region_id: str, x: float, y: float, width: float, height: float) -> dict:
    """A box as the annotator draws it (percent of the image), labeled but not captioned."""
    return {
        "id": region_id,
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 64,
        "original_height": 48,
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": 0,
            "rectanglelabels": ["Object"],
        },
    }


def test_prelabel_captions_every_box_once_and_reports_the_tasks_it_could_not_do(
    label_studio: LabelStudio, redis_conn, start_worker
):
    client = LabelStudioClient(label_studio.url, label_studio.token)
    folder = Path(label_studio.files_root) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    noise_image(64, 48, seed=5).save(folder / "a.png")
    Image.new("RGB", (64, 48), (30, 200, 30)).save(folder / "d.png")
    project = client.create_project("prelabel by the worker", CONFIG)
    client.add_local_storage(project, folder, "images")
    boxes = [rectangle("b1", 10, 10, 30, 40), rectangle("b2", 50, 20, 40, 60)]
    drawn, missing, empty, done = client.import_tasks(
        project,
        [
            {"data": {"image": "/data/local-files/?d=images/a.png"}},
            {"data": {"image": "/data/local-files/?d=images/missing.png"}},
            {"data": {"image": "/data/local-files/?d=images/a.png"}},
            {
                "data": {"image": "/data/local-files/?d=images/d.png"},
                "predictions": [{"model_version": "v1", "score": 0.5, "result": boxes[:1]}],
            },
        ],
    )
    client.create_annotation(drawn, boxes)
    client.create_annotation(missing, boxes)
    start_worker("w1", env={"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token})

    job = enqueue(
        redis_conn, PRELABEL, "worker.jobs.prelabel_tasks", project, [drawn, missing, empty, done, 999999]
    )
    summary = wait_for_result(job, timeout_s=120)

    assert summary["model_version"] == "v1"
    assert (summary["predicted"], summary["skipped_existing"], summary["skipped_no_regions"]) == (1, 1, 1)
    reasons = {failure["task"]: failure["reason"] for failure in summary["failed"]}
    assert set(reasons) == {missing, 999999}
    assert "HTTP 404" in reasons[missing] and "missing.png" in reasons[missing]
    assert reasons[999999] == f"project {project} has no task 999999"
    job.refresh()
    assert job.meta["progress"] == {"stage": "answering", "done": 5, "total": 5}

    [prediction] = client.predictions(drawn)
    assert prediction["model_version"] == "v1"
    items = {(item["id"], item["type"]): item for item in prediction["result"]}
    assert set(items) == {
        ("b1", "rectanglelabels"),
        ("b1", "textarea"),
        ("b2", "rectanglelabels"),
        ("b2", "textarea"),
    }
    # The captions are what the describe job answers for the same boxes.
    described = wait_for_result(
        enqueue(
            redis_conn,
            INTERACTIVE,
            "worker.jobs.describe_regions",
            {
                "image": {"url": "/data/local-files/?d=images/a.png", "task_id": drawn},
                "regions": [
                    {"id": "b1", "box": [0.1, 0.1, 0.4, 0.5]},
                    {"id": "b2", "box": [0.5, 0.2, 0.9, 0.8]},
                ],
                "questions": [
                    {"id": f"{rid}:caption", "text": "Describe <region1> briefly.", "regions": [rid]}
                    for rid in ("b1", "b2")
                ],
            },
        ),
        timeout_s=60,
    )
    # (a tiny random model runs to the length limit: the prediction says so after the text)
    assert [items[(rid, "textarea")]["value"]["text"] for rid in ("b1", "b2")] == [
        [f"{answer['text']} {TRUNCATED_MARK}" if answer["truncated"] else answer["text"]]
        for answer in described["answers"]
    ]

    again = wait_for_result(
        enqueue(redis_conn, PRELABEL, "worker.jobs.prelabel_tasks", project, [drawn, done]), 120
    )
    assert (again["predicted"], again["skipped_existing"], again["failed"]) == (0, 2, [])
    assert len(client.predictions(drawn)) == 1
