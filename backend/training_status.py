"""Start Training, as the annotator sees it: whether a project can train now, and how its fine-tune goes.

Label Studio 1.23.2 shows nothing of the backend's reply to Start Training: its train API answers 200 with
an empty body (ml/api.py), the dialog says "Request Sent! Response: {}", and a 2xx reply only sets the
backend's state to Training until the next refresh of the ML backend list. So:

* The refusal comes before anything is queued: a 422 reply naming the reason (Label Studio marks the
  backend Error until its next refresh, and drops the reply's text), a line in the backend's log, and the
  project's training status.
* A queued fine-tune answers {"job": ..., "status": "queued"} (Label Studio sets "Training").
* `GET /training/<project>` is where its progress and the gate's decision can be read
  (README: "Start Training").
"""

from __future__ import annotations

from typing import Any

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job

from backend import project_state
from backend.ls_client import LabelStudioClient
from backend.queues import SERIALIZER
from roi_contract.records import is_held_out


def finetune_job_id(project_id: int) -> str:
    return f"finetune-{project_id}"


def training_refusal(client: LabelStudioClient, project_id: int) -> str | None:
    """Why a fine-tune of the project cannot run now (it needs annotated tasks on both sides of the
    train / held-out split), or None. Reads task ids only until both sides are seen."""
    sides = {True: 0, False: 0}
    for task_id in client.annotated_task_ids(project_id):
        sides[is_held_out(task_id)] += 1
        if sides[True] and sides[False]:
            return None
    annotated = sides[True] + sides[False]
    return (
        f"project {project_id} has {annotated} annotated task{'s' if annotated != 1 else ''}: a fine-tune "
        "needs some to train on and some held out to judge it by (a quarter of the tasks, chosen by id); "
        "annotate more tasks, then start training again"
    )


def training_status(connection: redis.Redis, project_id: int) -> dict[str, Any]:
    """The project's fine-tune as RQ knows it: status, progress, the gate's decision or the failure."""
    job_id = finetune_job_id(project_id)
    refused = project_state.training_refusal(connection, project_id)
    if refused is not None:
        return {"project": project_id, "job": None, "status": "refused", **refused}
    try:
        job = Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
    except NoSuchJobError:
        return {"project": project_id, "job": None, "status": "none"}
    status: dict[str, Any] = {
        "project": project_id,
        "job": job_id,
        "status": str(job.get_status(refresh=False).value),
        "progress": job.meta.get("progress"),
        "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
    }
    result = job.latest_result()
    if result is not None and result.type == result.Type.SUCCESSFUL:
        run = result.return_value or {}
        status["decision"] = {key: run.get(key) for key in ("promoted", "decision", "candidate", "served")}
    elif result is not None and result.exc_string:
        status["failure"] = result.exc_string.strip().splitlines()[-1][:500]
    return status
