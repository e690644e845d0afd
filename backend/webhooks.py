"""Label Studio's webhooks: annotation counters, acceptance statistics, and the training triggers.

Label Studio POSTs every project event to /webhook, synchronously inside the annotator's save, and gives up
after 1 s (reference/label-studio.md §2.5), so handling one is a few Redis commands: count it, and enqueue a
fine-tuning job when a trigger fires. Handled actions:

* ANNOTATION_CREATED / ANNOTATION_UPDATED: count the event; a submitted (not skipped) annotation with a
  result is *curated*. Record how many of its regions were proposals accepted unchanged, edited proposals,
  or drawn by hand (the `origin` Label Studio keeps on every result item).
* ANNOTATIONS_DELETED: count it and drop those annotations from the region statistics.
* START_TRAINING ("Start Training" in Label Studio): enqueue fine-tuning.

Every `train_every` curated annotations (the project's extra params, else the backend's setting; 0 = off)
also enqueue fine-tuning. One fine-tuning job per project at a time: its id is ``finetune-<project>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from backend import project_state
from backend.project_state import RegionOrigins
from backend.queues import TRAIN
from backend.submit import submit_once

FINETUNE_JOB = "worker.jobs.finetune"

ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
START_TRAINING = "START_TRAINING"
HANDLED_ACTIONS = (ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_DELETED, START_TRAINING)

# A region made of several items (box + caption) counts once, by its most telling origin.
_ORIGIN_RANK = {"prediction": 0, "manual": 1, "prediction-changed": 2}


@dataclass(frozen=True)
class WebhookEvent:
    action: str
    project_id: int
    annotation_ids: tuple[int, ...] = ()
    curated: bool = False
    origins: RegionOrigins = field(default_factory=RegionOrigins)


def parse_event(body: Mapping[str, Any]) -> WebhookEvent | None:
    """The event of a webhook body; None for actions this backend ignores. Raises ValueError naming the problem."""
    action = body.get("action")
    if not isinstance(action, str):
        raise ValueError(f"webhook body needs a string 'action', got {action!r}")
    if action not in HANDLED_ACTIONS:
        return None
    project_id = _project_id(body)
    if action == START_TRAINING:
        return WebhookEvent(action, project_id)
    if action == ANNOTATIONS_DELETED:
        annotations = body.get("annotations")
        if not isinstance(annotations, list):
            raise ValueError(f"{action} needs an 'annotations' list, got {annotations!r}")
        return WebhookEvent(action, project_id, tuple(_annotation_id(a) for a in annotations))
    annotation = body.get("annotation")
    if not isinstance(annotation, Mapping):
        raise ValueError(f"{action} needs an 'annotation' object, got {annotation!r}")
    result = annotation.get("result") or []
    if not isinstance(result, list):
        raise ValueError(f"annotation {annotation.get('id')!r} has a 'result' that is not a list")
    return WebhookEvent(
        action,
        project_id,
        (_annotation_id(annotation),),
        curated=bool(result) and not annotation.get("was_cancelled"),
        origins=region_origins(result),
    )


def region_origins(result: Sequence[Mapping[str, Any]]) -> RegionOrigins:
    """Count the regions of an annotation result by origin; items sharing an id are one region.

    A region with any "prediction-changed" item was edited; else any "manual" item makes it hand-drawn;
    else it is an accepted proposal. Items without a known origin (imported annotations) are not counted.
    """
    region_origin: dict[Any, str] = {}
    for item in result:
        origin = item.get("origin") if isinstance(item, Mapping) else None
        if origin not in _ORIGIN_RANK:
            continue
        previous = region_origin.get(item.get("id"))
        if previous is None or _ORIGIN_RANK[origin] > _ORIGIN_RANK[previous]:
            region_origin[item.get("id")] = origin
    origins = list(region_origin.values())
    return RegionOrigins(
        accepted=origins.count("prediction"),
        edited=origins.count("prediction-changed"),
        manual=origins.count("manual"),
    )


def handle_event(
    connection: redis.Redis,
    event: WebhookEvent,
    *,
    default_train_every: int,
    finetune_job: str = FINETUNE_JOB,
) -> dict[str, Any]:
    """Record the event and fire the training triggers; returns the JSON reply."""
    if event.action == START_TRAINING:
        return {
            "status": "ok",
            "training": request_training(connection, event.project_id, START_TRAINING, finetune_job),
        }
    if event.action == ANNOTATIONS_DELETED:
        project_state.forget_annotations(connection, event.project_id, event.annotation_ids)
        return {"status": "recorded"}

    curated_total = project_state.record_annotation(
        connection,
        event.project_id,
        event.annotation_ids[0],
        updated=event.action == ANNOTATION_UPDATED,
        curated=event.curated,
        origins=event.origins,
    )
    reply: dict[str, Any] = {"status": "recorded", "curated": curated_total}
    if event.curated:
        train_every = project_state.load_params(connection, event.project_id).train_every
        train_every = default_train_every if train_every is None else train_every
        if train_every and curated_total % train_every == 0:
            reason = f"{curated_total} curated annotations (training every {train_every})"
            reply["training"] = request_training(connection, event.project_id, reason, finetune_job)
    return reply


def request_training(
    connection: redis.Redis, project_id: int, reason: str, finetune_job: str = FINETUNE_JOB
) -> dict[str, Any]:
    """Enqueue fine-tuning for the project unless a fine-tuning job of that project is queued or running."""
    job, created = submit_once(
        connection,
        TRAIN,
        finetune_job,
        job_id=f"finetune-{project_id}",
        reuse_finished=False,
        project_id=project_id,
        reason=reason,
    )
    if created:
        return {"status": "queued", "job_id": job.id, "reason": reason}
    return {"status": "already queued or running", "job_id": job.id}


def _project_id(body: Mapping[str, Any]) -> int:
    project = body.get("project")
    if isinstance(project, Mapping):
        project = project.get("id")
    if project is None and isinstance(body.get("annotation"), Mapping):
        project = body["annotation"].get("project")
    return project_state.parse_project_id(project)


def _annotation_id(annotation: Any) -> int:
    annotation_id = annotation.get("id") if isinstance(annotation, Mapping) else None
    if isinstance(annotation_id, bool) or not isinstance(annotation_id, int):
        raise ValueError(f"an annotation needs an integer 'id', got {annotation!r}")
    return annotation_id
