"""The job functions the workers run. The backend enqueues them by dotted name; arguments and results are JSON.

* `describe_regions(request)`: the describe job of DESIGN.md, for the interactive and the prelabel queues.
* `prelabel_tasks(project_id, task_ids)`: reads tasks from Label Studio, describes every region they carry
  (the engine batches a group of images at a time), and writes the predictions back, once per task and
  model version.
* `prelabel_chunk(project_id, selection, chunk, task_ids)`: `prelabel_tasks` for one chunk of a bulk
  pre-label (backend/selections.py), counted into the selection's progress.
* `finetune(project_id, reason)`: one fine-tuning run behind the regression gate (worker/finetune.py).

Each job takes the settings and the model of its process from worker.process_context and raises on
failure: ValueError and backend.images.ImageRejected for input that will never work, anything in
worker/failures.py for a cause that may pass (the worker retries only those). A new job (fine-tuning,
export) is one more function here, enqueued under its dotted name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from PIL import Image
from rq import get_current_job
from rq.exceptions import AbandonedJobError

from backend.describe_jobs import describe_request
from backend.images import ImageRejected, RecentImages, load_image
from backend.labeling import LabelingScheme, scheme_from_config
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.predictions import prediction_from_answers
from backend.regions import Region, task_regions
from backend.selections import chunk_ended, chunk_failed, claim_prediction, is_cancelled, release_prediction
from backend.settings import Settings
from roi_contract.describe import Answer, DescribeRequest, DescribeResult
from roi_contract.project import ProjectSettings, Prompts
from roi_contract.validation import parse
from roi_model.engine import ImageRequest, RegionQuery
from roi_model.generation import GenerationOptions
from worker import process_context
from worker.failures import is_transient
from worker.finetune import finetune
from worker.job_progress import JobProgress

log = logging.getLogger(__name__)

__all__ = ["describe_regions", "finetune", "prelabel_chunk", "prelabel_chunk_failed", "prelabel_tasks"]

# An annotator drawing box after box on one image starts a describe job per box: fetch the image once.
# (prelabel_tasks reads each task's image once, so it does not use it.)
# What makes two failures' reasons differ although they are of one kind: URLs, paths, numbers.
_SPECIFICS = re.compile(r"\S+://\S+|/data/\S+|\d+")
# A question's length in the model's tokens: far above any real question, far below what fills a GPU.
MAX_QUESTION_TOKENS = 512

_recent_images = RecentImages(ttl_s=60.0, max_bytes=64 * 1024 * 1024)


def describe_regions(request: dict) -> dict:
    """Answer the request's questions about its regions (the describe job, roi_contract.describe).

    The request is checked in full before the image is fetched. Returns the DescribeResult as JSON: one
    answer per question, in question order.
    """
    context = process_context.current()
    parsed = parse(DescribeRequest, request, "describe request")
    image = load_image(
        parsed.image.url, task_id=parsed.image.task_id, settings=context.settings, cache=_recent_images
    )
    engine, version = context.model().serve(parsed.project)
    check_question_lengths(parsed, engine.processor.tokenizer)
    [answers] = engine.answer([engine_request(parsed, image)])
    return describe_result(parsed, answers, version).model_dump(mode="json")


def check_question_lengths(request: DescribeRequest, tokenizer) -> None:
    """ValueError naming the first question longer than MAX_QUESTION_TOKENS in the model's own tokens."""
    for question in request.questions:
        tokens = len(tokenizer(question.text, add_special_tokens=False)["input_ids"])
        if tokens > MAX_QUESTION_TOKENS:
            raise ValueError(
                f"question {question.id!r} is {tokens} tokens long; at most {MAX_QUESTION_TOKENS} are answered"
            )


def engine_request(request: DescribeRequest, image: Image.Image) -> ImageRequest:
    """The engine's request for a describe job, on its decoded image."""
    return ImageRequest(
        image,
        [RegionQuery(question.text, request.boxes_of(question)) for question in request.questions],
        GenerationOptions(max_new_tokens=request.max_new_tokens),
    )


def describe_result(request: DescribeRequest, answers: list, version: str) -> DescribeResult:
    """The engine's answers as the job's result: one per question, in question order."""
    return DescribeResult(
        model_version=version,
        answers=[
            Answer(id=question.id, text=answer.text, score=answer.score, truncated=answer.truncated)
            for question, answer in zip(request.questions, answers, strict=True)
        ],
    )


@dataclass
class _PlannedTask:
    """A task whose prediction is about to be made: its regions, its describe request, its image."""

    task_id: int
    regions: list[Region]
    request: DescribeRequest
    image: Image.Image


def prelabel_tasks(project_id: int, task_ids: list[int], project_settings: dict | None = None) -> dict:
    """Predict the regions of the given tasks of a project and store the predictions in Label Studio.

    Tasks that already hold a prediction from the served model version are skipped, so a retried or repeated
    job does no work twice. A task that cannot be predicted (no image, an image that cannot be fetched, a
    question that does not fit) is listed under "failed" with the reason; the others are still predicted.
    `project_settings` is the project's roi_contract.project.ProjectSettings as JSON (controls and prompts;
    None: the defaults).

    Returns {"predicted", "skipped_existing", "skipped_no_regions", "failed": [{"task", "reason"}],
    "model_version"}.
    """
    _check_ids(project_id, task_ids)
    settings_of_project = parse(ProjectSettings, project_settings or {}, "project settings")
    context = process_context.current()
    settings = context.settings
    if not settings.label_studio_api_key:
        raise ValueError("LABEL_STUDIO_API_KEY is not set: prelabeling reads tasks and writes predictions")
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    project = client.get_project(project_id)
    scheme = scheme_from_config(project["label_config"], settings_of_project.controls)
    prompts = settings_of_project.prompts
    engine, version = context.model().serve(project_id)
    summary: dict[str, Any] = {
        "predicted": 0,
        "skipped_existing": 0,
        "skipped_no_regions": 0,
        "failed": [],
        "model_version": version,
    }
    progress = JobProgress()
    wanted = list(dict.fromkeys(task_ids))

    claims = _WriteClaims.of_current_job(context.connection, project_id, version)
    tasks = {task["id"]: task for task in client.get_tasks(project_id, wanted)}
    # A group of images at a time through the engine (it batches across them), written back before the
    # next is read: peak memory depends on the group, not on how many tasks the job was given.
    group = max(settings.prelabel_chunk_tasks, 1)
    for start in range(0, len(wanted), group):
        planned: list[_PlannedTask] = []
        for task_id in wanted[start : start + group]:
            task = tasks.get(task_id)
            if task is None:
                summary["failed"].append(
                    {
                        "task": task_id,
                        "reason": f"project {project_id} has no task {task_id}",
                        "kind": "no such task",
                    }
                )
            elif any(p.get("model_version") == version for p in task.get("predictions") or []):
                summary["skipped_existing"] += 1
            else:
                try:
                    plan = _plan(task, scheme, prompts, settings, engine.processor.tokenizer)
                except (ValueError, ImageRejected) as error:  # ImageRejected includes ImageUnavailable
                    summary["failed"].append(_failure(task_id, error))
                else:
                    if plan is None:
                        summary["skipped_no_regions"] += 1
                    else:
                        planned.append(plan)
        progress.report("answering", done=start, total=len(wanted))
        requests = [engine_request(p.request, p.image) for p in planned]
        answers = engine.answer(requests, remember=False) if planned else []
        for plan, task_answers in zip(planned, answers, strict=True):
            _write_prediction(client, scheme, plan, task_answers, version, summary, claims)
        progress.report("answering", done=min(start + group, len(wanted)), total=len(wanted))
    log.info("prelabel project=%s %s", project_id, summary)
    return summary


@dataclass(frozen=True)
class _WriteClaims:
    """Which job writes a task's prediction (backend.selections.claim_prediction); a job run outside a
    worker (no Redis, no current job) claims nothing and writes."""

    connection: redis.Redis | None
    project_id: int
    version: str
    owner: str | None

    @classmethod
    def of_current_job(cls, connection: redis.Redis | None, project_id: int, version: str) -> _WriteClaims:
        job = get_current_job()
        return cls(connection, project_id, version, job.id if job is not None else None)

    def claim(self, task_id: int) -> bool:
        if self.connection is None or self.owner is None:
            return True
        return claim_prediction(self.connection, self.project_id, task_id, self.version, self.owner)

    def release(self, task_id: int) -> None:
        if self.connection is not None and self.owner is not None:
            release_prediction(self.connection, self.project_id, task_id, self.version, self.owner)


def _write_prediction(
    client: LabelStudioClient,
    scheme: LabelingScheme,
    plan: _PlannedTask,
    answers: list,
    version: str,
    summary: dict[str, Any],
    claims: _WriteClaims,
) -> None:
    if not claims.claim(plan.task_id):
        summary["skipped_existing"] += 1  # another selection's chunk writes it
        return
    try:
        result = describe_result(plan.request, answers, version)
        prediction = prediction_from_answers(scheme, plan.regions, result, request=plan.request)
        client.create_prediction(plan.task_id, prediction["result"], prediction["score"], version)
    except (ValueError, LabelStudioError) as error:
        if is_transient(error):
            raise  # Label Studio is unreachable or failing: retry; the predictions made so far are kept
        claims.release(plan.task_id)
        summary["failed"].append(_failure(plan.task_id, error))
    else:
        summary["predicted"] += 1


def prelabel_chunk(
    project_id: int, selection: str, chunk: int, task_ids: list[int], project_settings: dict | None = None
) -> dict:
    """One chunk of a selection (backend/selections.py): prelabel_tasks on its tasks, then its outcome added
    to the selection's counters once. A chunk of a cancelled selection does nothing."""
    connection = process_context.current().connection
    if connection is not None and is_cancelled(connection, selection):
        chunk_ended(connection, selection, chunk, done=0, failures=[])
        return {"cancelled": True}
    summary = prelabel_tasks(project_id, task_ids, project_settings)
    if connection is not None:
        done = summary["predicted"] + summary["skipped_existing"] + summary["skipped_no_regions"]
        chunk_ended(connection, selection, chunk, done=done, failures=[f["kind"] for f in summary["failed"]])
    return summary


def prelabel_chunk_failed(job, connection: redis.Redis, error_type, error: BaseException, traceback) -> None:
    """RQ's failure callback of a chunk job (it runs before RQ decides on a retry): once the chunk will not
    be re-run, its tasks count as failed in the selection, with the error as their reason."""
    # A dead worker's chunk (AbandonedJobError, from RQ's cleanup) is re-queued while it has retries.
    if job.should_retry and (is_transient(error) or isinstance(error, AbandonedJobError)):
        return
    chunk_failed(connection, job, f"the chunk failed: {error_type.__name__}: {error}"[:300])


def _failure(task_id: int, error: Exception) -> dict:
    """A task that could not be predicted: the whole reason, and its kind (what a selection counts by)."""
    kind = error.problem if isinstance(error, ImageRejected) else str(error)
    return {"task": task_id, "reason": str(error), "kind": _SPECIFICS.sub("…", kind)[:200]}


def _plan(
    task: Mapping[str, Any], scheme: LabelingScheme, prompts: Prompts, settings: Settings, tokenizer
) -> _PlannedTask | None:
    """The task's regions, request and image; None when it has nothing to ask about."""
    regions, source_result = task_regions(task, scheme)
    if not regions:
        return None
    request = describe_request(
        task,
        regions,
        scheme,
        prompts,
        source_result=source_result,
        max_new_tokens=settings.max_new_tokens,
    )
    if request is None:
        return None  # region_qa: no region carries a typed question
    check_question_lengths(request, tokenizer)
    image = load_image(request.image.url, task_id=request.image.task_id, settings=settings)
    return _PlannedTask(task["id"], regions, request, image)


def _check_ids(project_id: Any, task_ids: Any) -> None:
    if not isinstance(project_id, int) or isinstance(project_id, bool):
        raise ValueError(f"project_id must be an integer, got {project_id!r}")
    if not isinstance(task_ids, list) or not all(
        isinstance(task_id, int) and not isinstance(task_id, bool) for task_id in task_ids
    ):
        raise ValueError(f"task_ids must be a list of integers, got {task_ids!r}")
