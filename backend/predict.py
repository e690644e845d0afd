"""/predict: turn Label Studio's tasks into describe jobs, wait for the workers, and answer one item per task.

Two kinds of call arrive (reference/label-studio.md §2.3, §2.4):

* interactive (``params.context`` set, one task): the annotator drew a box or typed into one (backend/
  interactive.py decides what to ask). Ask it on the `interactive` queue, wait up to the predict timeout,
  and reply with the boxes echoed plus the answer items sharing their ids.
* batch ("Retrieve predictions", auto-predict when a task opens): describe the regions each task already
  has. Up to `inline_tasks` tasks with regions are answered inline (one describe job each, waited for
  together); a larger selection is answered with the results that are ready, and the rest becomes a
  selection of chunks on the prelabel queue (backend/selections.py) that write back through Label Studio's
  API, with progress at GET /prelabel/<project>.

Describe jobs get a deterministic id (a digest of the job payload), so identical requests share one job:
opening a task fires two identical /predict calls, and a result stays reusable for the queue's result_ttl.

What each task's item means to Label Studio 1.23.2 (ml/models.py, `_get_predictions_from_ml_backend`):
an element of "results" may be one prediction or a list of them, and each is stored.

* ``{"result": [...], "score", "model_version"}``: stored as a prediction.
* ``[]``: stores nothing, and logs nothing. The answer for a task with nothing to describe (no regions, no
  typed question yet), for one handed to the prelabel queue (its job writes the prediction later), and
  for one that failed (the reason is in the backend's log). An empty prediction would be worse: Label
  Studio would store it under the served version and skip the task in every later "Retrieve
  predictions", so boxes drawn there later would never be described.
* a dict without "result": Label Studio logs "incorrect prediction" as an ERROR; never sent.

Interactive replies are read by the labeling UI itself, see `_interactive`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from rq.job import Job
from werkzeug.exceptions import BadRequest

from backend.describe_jobs import describe_request
from backend.interactive import plan_interactive
from backend.labeling import LabelingScheme
from backend.predictions import failure_prediction, prediction_from_answers
from backend.project_state import parse_project_id
from backend.queues import INTERACTIVE, JobFailed, JobTimeout, wait_for_result
from backend.regions import Region, task_regions
from backend.selections import start_selection
from backend.submit import finished_return_values, submit_once
from roi_contract.describe import DescribeRequest, DescribeResult
from roi_contract.project import ProjectSettings, Prompts
from roi_contract.validation import ContractError, parse

log = logging.getLogger(__name__)

DESCRIBE_JOB = "worker.jobs.describe_regions"
PRELABEL_JOB = "worker.jobs.prelabel_chunk"
PRELABEL_FAILED = "worker.jobs.prelabel_chunk_failed"


@dataclass(frozen=True)
class PredictRequest:
    project_id: int
    label_config: str
    tasks: list[dict[str, Any]]
    context_result: list[dict[str, Any]] | None  # the regions of an interactive call; None for batch

    @property
    def interactive(self) -> bool:
        return self.context_result is not None


def parse_predict_request(body: Mapping[str, Any]) -> PredictRequest:
    """Check the /predict body; raises BadRequest naming the problem."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("'tasks' must be a non-empty list of Label Studio tasks")
    label_config = body.get("label_config")
    if not isinstance(label_config, str) or not label_config.strip():
        raise BadRequest("'label_config' must be the project's label config (XML)")
    try:
        project_id = parse_project_id(body.get("project"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("'params' must be a JSON object")
    context = params.get("context")
    context_result = None
    if context is not None:
        if not isinstance(context, dict) or not isinstance(context.get("result"), list):
            raise BadRequest("'params.context' must be a JSON object with a 'result' list")
        if len(tasks) != 1:
            raise BadRequest(
                f"an interactive call (params.context set) needs exactly one task, got {len(tasks)}"
            )
        if malformed_task(tasks[0], 0):
            raise BadRequest(malformed_task(tasks[0], 0))
        context_result = [item for item in context["result"] if isinstance(item, dict)]
    return PredictRequest(project_id, label_config, tasks, context_result)


@dataclass
class TaskPlan:
    """What to do for one task: run `request` as a describe job, or answer `outcome` as it is."""

    task_id: Any
    regions: Sequence[Region] = ()
    request: DescribeRequest | None = None
    outcome: dict[str, Any] | None = None


def malformed_task(task: Any, index: int) -> str | None:
    """Why `task` (the index-th of the call) is not a Label Studio task; None when it is one."""
    if not isinstance(task, Mapping):
        return f"task {index} is not a JSON object"
    task_id = task.get("id")
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        return f"task {index} has no integer 'id'"
    return None


def plan_batch_task(
    task: Any, scheme: LabelingScheme, prompts: Prompts, max_new_tokens: int, index: int = 0
) -> TaskPlan:
    """Describe the regions a task already has; an empty result when it has none (or nothing to ask).

    A malformed task gets an error naming what is wrong with it; the others of the call are answered."""
    problem = malformed_task(task, index)
    if problem is not None:
        return TaskPlan(None, outcome=failed(problem))
    try:
        regions, source_result = task_regions(task, scheme)
        if not regions:
            return TaskPlan(task.get("id"), outcome=empty())
        request = describe_request(
            task, regions, scheme, prompts, source_result=source_result, max_new_tokens=max_new_tokens
        )
    except ValueError as exc:
        return TaskPlan(task.get("id"), outcome=failed(str(exc)))
    if request is None:
        return TaskPlan(task.get("id"), regions, outcome=empty())
    return TaskPlan(task.get("id"), regions, request)


def empty() -> dict[str, Any]:
    """Nothing to describe on the task."""
    return {"result": [], "score": 0.0}


def _stored_prediction(outcome: dict[str, Any] | None) -> dict[str, Any] | list:
    """A batch item: the prediction when there is one to store, else [] (Label Studio stores nothing)."""
    if outcome and outcome.get("result"):
        return outcome
    return []


def failed(reason: str) -> dict[str, Any]:
    return {"error": reason}


def for_project(request: DescribeRequest, project_id: int) -> DescribeRequest:
    """The request as the project asks it: answered with the project's adapter, a job of its own."""
    return request.model_copy(update={"project": project_id})


def describe_job_id(request: DescribeRequest) -> str:
    """The same id for the same describe payload."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "describe-" + hashlib.sha256(canonical.encode()).hexdigest()[:40]


class Predictor:
    """Runs the plans against the queues; one per app, shared by its threads."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        timeout_s: float,
        inline_tasks: int,
        chunk_tasks: int,
        max_new_tokens: int,
        describe_job: str = DESCRIBE_JOB,
        prelabel_job: str = PRELABEL_JOB,
        prelabel_failed: str | None = PRELABEL_FAILED,
    ) -> None:
        self.connection = connection
        self.timeout_s = timeout_s
        self.inline_tasks = inline_tasks
        self.chunk_tasks = chunk_tasks
        self.max_new_tokens = max_new_tokens
        self.describe_job = describe_job
        self.prelabel_job = prelabel_job
        self.prelabel_failed = prelabel_failed

    def predict(
        self, call: PredictRequest, scheme: LabelingScheme, params: ProjectSettings
    ) -> dict[str, Any]:
        """The /predict reply: {"results": [one item per task, in order]}."""
        if call.interactive:
            return {"results": [self._interactive(call, scheme, params)]}
        return {"results": self._batch(call, scheme, params)}

    def _interactive(self, call: PredictRequest, scheme: LabelingScheme, params: ProjectSettings) -> dict:
        """The reply the labeling UI reads (backend/interactive.py): suggestions, or no result at all."""
        task = call.tasks[0]
        try:
            plan = plan_interactive(
                task, call.context_result or [], scheme, params.prompts, self.max_new_tokens
            )
        except ValueError as exc:
            log.warning("project %s task %s: interactive: %s", call.project_id, task.get("id"), exc)
            return failed(str(exc))
        if plan.waiting is not None:
            log.info("project %s task %s: interactive: %s", call.project_id, plan.task_id, plan.waiting)
            return {"status": "waiting", "reason": plan.waiting}
        job, _ = self._submit_describe(plan, call.project_id)
        task_plan = TaskPlan(plan.task_id, plan.regions, plan.request)
        outcome = self._collect(task_plan, job, scheme, time.monotonic() + self.timeout_s, kept=plan.kept)
        if "error" not in outcome:
            return outcome
        log.warning("project %s task %s: interactive: %s", call.project_id, plan.task_id, outcome["error"])
        try:
            shown = failure_prediction(scheme, plan.regions, outcome["error"], kept=plan.kept)
        except ValueError as exc:  # a box that cannot be echoed: leave every box as it is
            log.warning(
                "project %s task %s: the boxes cannot be echoed: %s", call.project_id, plan.task_id, exc
            )
            shown = None
        return shown or outcome

    def _batch(self, call: PredictRequest, scheme: LabelingScheme, params: ProjectSettings) -> list:
        plans = [
            plan_batch_task(task, scheme, params.prompts, self.max_new_tokens, index)
            for index, task in enumerate(call.tasks)
        ]
        to_describe = [plan for plan in plans if plan.request is not None]
        if len(to_describe) <= self.inline_tasks:
            deadline = time.monotonic() + self.timeout_s
            jobs = [(plan, self._submit_describe(plan, call.project_id)[0]) for plan in to_describe]
            for plan, job in jobs:
                plan.outcome = self._collect(plan, job, scheme, deadline)
        else:
            self._answer_ready_or_hand_over(call, to_describe, scheme, params)
        for plan in plans:
            if plan.outcome and "error" in plan.outcome:
                log.warning("project %s task %s: %s", call.project_id, plan.task_id, plan.outcome["error"])
        return [_stored_prediction(plan.outcome) for plan in plans]

    def _answer_ready_or_hand_over(
        self, call: PredictRequest, plans: Sequence[TaskPlan], scheme: LabelingScheme, params: ProjectSettings
    ) -> None:
        """Answer the tasks whose describe job already finished; the rest become a selection, chunks on
        the prelabel queue that write their predictions back (backend/selections.py)."""
        pending = []
        for start in range(0, len(plans), self.chunk_tasks):
            page = plans[start : start + self.chunk_tasks]
            values = finished_return_values(
                self.connection, [describe_job_id(for_project(p.request, call.project_id)) for p in page]
            )
            for plan, (ready, answer) in zip(page, values, strict=True):
                if ready:
                    plan.outcome = self._prediction(plan, answer, scheme)
                else:
                    pending.append(plan)
        if not pending:
            return
        status = start_selection(
            self.connection,
            call.project_id,
            [plan.task_id for plan in pending],
            chunk_tasks=self.chunk_tasks,
            job_name=self.prelabel_job,
            failure_callback=self.prelabel_failed,
            project_settings=params.model_dump(mode="json", exclude_defaults=True) or None,
        )
        log.info(
            "project %s: %d tasks handed to the prelabel queue as selection %s (%d chunks; progress: GET "
            "/prelabel/%s)",
            call.project_id,
            len(pending),
            status["selection"],
            status["chunks"],
            call.project_id,
        )
        for plan in pending:
            plan.outcome = {"status": "queued", "selection": status["selection"]}

    def _submit_describe(self, plan: TaskPlan, project_id: int) -> tuple[Job, bool]:
        request = for_project(plan.request, project_id)
        return submit_once(
            self.connection,
            INTERACTIVE,
            self.describe_job,
            request.model_dump(mode="json"),
            job_id=describe_job_id(request),
            reuse_finished=True,
        )

    def _collect(
        self, plan: TaskPlan, job: Job, scheme: LabelingScheme, deadline: float, kept: Sequence[Mapping] = ()
    ) -> dict[str, Any]:
        try:
            answer = wait_for_result(job, max(deadline - time.monotonic(), 0.001))
        except JobTimeout:
            return failed(f"no answer within {self.timeout_s:g} s (the workers are busy or down)")
        except JobFailed as exc:
            return failed(f"the worker could not answer: {exc.reason}")
        return self._prediction(plan, answer, scheme, kept)

    def _prediction(
        self, plan: TaskPlan, answer: Any, scheme: LabelingScheme, kept: Sequence[Mapping] = ()
    ) -> dict[str, Any]:
        try:
            result = parse(DescribeResult, answer, "the worker's answer")
            return prediction_from_answers(scheme, plan.regions, result, request=plan.request, kept=kept)
        except ContractError as exc:
            return failed(str(exc))
        except ValueError as exc:
            return failed(f"the worker's answer does not fit: {exc}")
