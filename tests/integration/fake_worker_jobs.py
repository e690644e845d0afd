"""Stand-ins for worker.jobs with the same signatures, run by a real RQ worker in the backend's tests.

They answer deterministically without a model, so the tests check the backend's side of the protocol: the
payload it sends, how it waits, and how it turns answers into Label Studio results. Each call is logged in
the Redis list `CALLS` (JSON), so a test can count how many jobs really ran.

Behaviour chosen by the task's image URL: one containing "unreachable" fails the way an image fetch
fails; one containing "hold=<path>" waits until that file exists (a job still running).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from rq import get_current_job

CALLS = "fake:calls"
MODEL_VERSION = "fake-v1"


def _log_call(name: str, **arguments) -> None:
    get_current_job().connection.rpush(CALLS, json.dumps({"job": name, **arguments}))


def describe_regions(request: dict) -> dict:
    url = request["image"]["url"]
    _log_call("describe_regions", request=request)
    if "unreachable" in url:
        raise ConnectionError(f"cannot fetch {url}: connection refused")
    hold = re.search(r"hold=([^&]+)", url)
    if hold:
        deadline = time.monotonic() + 30
        while not Path(hold.group(1)).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    answers = []
    for question in request["questions"]:
        if "Answer with one of:" in question["text"]:
            text = question["text"].split("Answer with one of:")[1].split(",")[0].strip(" .")
        else:
            boxes = {region["id"]: region["box"] for region in request["regions"]}
            text = f"{question['text']} | " + " ".join(f"{rid}={boxes[rid]}" for rid in question["regions"])
        answers.append({"id": question["id"], "text": text, "score": -0.25})
    return {"model_version": MODEL_VERSION, "answers": answers}


def prelabel_chunk(
    project_id: int, selection: str, chunk: int, task_ids: list, project_settings: dict | None = None
) -> dict:
    _log_call("prelabel_chunk", project_id=project_id, task_ids=task_ids, project_settings=project_settings)
    return {"written": len(task_ids)}


def finetune(project_id: int, reason: str) -> dict:
    _log_call("finetune", project_id=project_id, reason=reason)
    return {"project_id": project_id, "reason": reason}
