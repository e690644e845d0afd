"""Label Studio's webhooks: annotation counters, acceptance statistics, and the training triggers.

Label Studio POSTs every project event to /webhook, synchronously inside the annotator's save, and gives up
after 1 s (reference/label-studio.md §2.5), so handling one is a few Redis commands: count it, and enqueue a
fine-tuning job when a trigger fires. Handled actions:

* ANNOTATION_CREATED / ANNOTATION_UPDATED: count the event; a submitted (not skipped) annotation with a
  result is *curated*. (How often proposals were accepted is measured from the export's provenance, by
  the fine-tuning run.)
* ANNOTATIONS_DELETED: count it.
* START_TRAINING ("Start Training" in Label Studio): enqueue fine-tuning.

Every `train_every` curated annotations (the project's extra params, else the backend's setting; 0 = off)
also enqueue fine-tuning. One fine-tuning job per project at a time: its id is ``finetune-<project>``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from backend import project_state
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.queues import TRAIN
from backend.submit import submit_once
from backend.training_status import finetune_job_id, training_refusal

log = logging.getLogger(__name__)

FINETUNE_JOB = "worker.jobs.finetune"

ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
START_TRAINING = "START_TRAINING"
HANDLED_ACTIONS = (ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_DELETED, START_TRAINING)


@dataclass(frozen=True)
class WebhookEvent:
    action: str
    project_id: int
    annotation_ids: tuple[int, ...] = ()
    curated: bool = False


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
            raise ValueError(f"{action} needs an 'annotations' list, got {str(annotations)[:80]!r}")
        return WebhookEvent(action, project_id, tuple(_annotation_id(a) for a in annotations))
    annotation = body.get("annotation")
    if not isinstance(annotation, Mapping):
        raise ValueError(f"{action} needs an 'annotation' object, got {str(annotation)[:80]!r}")
    result = annotation.get("result") or []
    if not isinstance(result, list):
        raise ValueError(f"annotation {annotation.get('id')!r} has a 'result' that is not a list")
    return WebhookEvent(
        action,
        project_id,
        (_annotation_id(annotation),),
        curated=bool(result) and not annotation.get("was_cancelled"),
    )


class TrainingRefused(ValueError):
    """Start Training for a project that cannot train now; the message says why and what to do."""


def handle_event(
    connection: redis.Redis,
    event: WebhookEvent,
    *,
    default_train_every: int,
    finetune_job: str = FINETUNE_JOB,
    label_studio: LabelStudioClient | None = None,
) -> dict[str, Any]:
    """Record the event and fire the training triggers; returns the JSON reply.

    Start Training is checked first through `label_studio` (when the backend has a key for it): a project
    that cannot train raises TrainingRefused before anything is queued.
    """
    if event.action == START_TRAINING:
        if label_studio is not None:
            try:
                refusal = training_refusal(label_studio, event.project_id)
            except (
                LabelStudioError
            ) as error:  # the fine-tune checks again; a Label Studio hiccup is no refusal
                log.warning(
                    "project %s: cannot check before training (%s); queueing it", event.project_id, error
                )
                refusal = None
            project_state.record_training_refusal(connection, event.project_id, refusal)
            if refusal is not None:
                raise TrainingRefused(refusal)
        training = request_training(connection, event.project_id, START_TRAINING, finetune_job)
        # "job" is what Label Studio reads to show the backend as Training.
        return {"status": training["status"], "job": training["job_id"], "training": training}
    if event.action == ANNOTATIONS_DELETED:
        project_state.count_event(
            connection,
            event.project_id,
            "annotations_deleted",
            curated=False,
            amount=len(event.annotation_ids),
        )
        return {"status": "recorded"}

    event_name = "annotations_updated" if event.action == ANNOTATION_UPDATED else "annotations_created"
    curated_total = project_state.count_event(connection, event.project_id, event_name, curated=event.curated)
    reply: dict[str, Any] = {"status": "recorded", "curated": curated_total}
    if event.curated:
        train_every = project_state.load_settings(connection, event.project_id).train_every
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
        job_id=finetune_job_id(project_id),
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
