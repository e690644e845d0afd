"""The few Label Studio API calls this project makes, on top of `label_studio_sdk.LabelStudio`.

Each method is the SDK call plus what the SDK leaves to us: plain JSON back where the
caller works with LS's JSON (tasks, exports, predictions), the response body of calls the
SDK discards (interactive annotating, data-manager actions), the two endpoints the SDK
lacks (config validation without a project, project model versions), and one exception
class, `LabelStudioError`, carrying LS's status code and message. For anything else use
`client.sdk` directly.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

log = logging.getLogger(__name__)

JSON = dict[str, Any]
TASKS_PER_PAGE = 100


class LabelStudioError(RuntimeError):
    """Label Studio refused or failed a call; `status_code` is None when it could not be reached."""

    def __init__(self, operation: str, status_code: int | None, message: str):
        self.operation = operation
        self.status_code = status_code
        self.message = message
        status = f"HTTP {status_code}" if status_code is not None else "no response"
        super().__init__(f"Label Studio {operation}: {status}: {message}")


def error_message(body: Any) -> str:
    """LS's own words from an error body: the validation errors if any, else `detail`, else the body."""
    if isinstance(body, dict):
        errors = body.get("validation_errors")
        if isinstance(errors, dict) and errors:
            parts = []
            for field, problems in errors.items():
                problems = problems if isinstance(problems, list) else [problems]
                parts.extend(f"{field}: {problem}" for problem in problems)
            return "; ".join(str(part) for part in parts)
        if errors:
            return str(errors)
        if body.get("detail"):
            return str(body["detail"])
        return json.dumps(body)
    return str(body)


@contextmanager
def translated_errors(operation: str) -> Iterator[None]:
    """SDK calls fail with LabelStudioError (Label Studio's status and words) inside this block."""
    try:
        yield
    except ApiError as error:
        raise LabelStudioError(operation, error.status_code, error_message(error.body)) from error
    except httpx.HTTPError as error:
        raise LabelStudioError(operation, None, f"{type(error).__name__}: {error}") from error


def _raise_for_status(operation: str, response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        raise LabelStudioError(operation, response.status_code, error_message(body))


def _plain(model: Any) -> Any:
    """An SDK model as the JSON LS sent (field names as LS spells them)."""
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True)


class LabelStudioClient:
    """A Label Studio server reached with a legacy token or a personal access token (the SDK refreshes it)."""

    def __init__(self, url: str, api_key: str, timeout_s: float = 120.0):
        # The timeout covers LS's own synchronous call to our /predict (100 s by default).
        self.url = url.rstrip("/")
        with translated_errors("connect"):  # the SDK refuses a personal access token without an expiry here
            self.sdk = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout_s)

    def auth_header(self) -> dict[str, str]:
        """The Authorization header the SDK sends: the legacy token, or a current access token for a personal
        access token (the SDK exchanges it at /api/token/refresh/ and renews it when it expires)."""
        with translated_errors("renew the access token"):
            return {"Authorization": self.sdk._client_wrapper.get_headers()["Authorization"]}

    def _http(self, operation: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # The SDK's own HTTP client: the same base URL, auth headers and token refresh.
        with translated_errors(operation):
            response = self.sdk._client_wrapper.httpx_client.request(path, method=method, **kwargs)
        _raise_for_status(operation, response)
        return response

    # Projects

    def validate_config(self, label_config: str) -> list[str]:
        """LS's own validation of a labeling config; [] when it is valid, else LS's messages."""
        with translated_errors("validate label config"):
            response = self.sdk._client_wrapper.httpx_client.request(
                "api/projects/validate/", method="POST", json={"label_config": label_config}
            )
        if response.status_code == 400:
            body = response.json()
            # This endpoint answers {"label_config": [...]}, not LS's usual {"validation_errors": ...}.
            errors = body.get("label_config") if isinstance(body, dict) else None
            return [str(error) for error in errors] if errors else [error_message(body)]
        _raise_for_status("validate label config", response)
        return []

    def create_project(self, title: str, label_config: str, **fields: Any) -> int:
        """A new project; `fields` go to the SDK's projects.create (description, ...). Returns its id."""
        with translated_errors(f"create project {title!r}"):
            return self.sdk.projects.create(title=title, label_config=label_config, **fields).id

    def find_project_by_title(self, title: str) -> int | None:
        """The id of the first project with exactly this title, or None."""
        with translated_errors(f"find project {title!r}"):
            for project in self.sdk.projects.list(title=title):
                if project.title == title:
                    return project.id
        return None

    def get_project(self, project: int) -> JSON:
        with translated_errors(f"get project {project}"):
            return _plain(self.sdk.projects.get(id=project))

    def model_versions(self, project: int) -> dict[str, int]:
        """{model_version: number of predictions} over the project's predictions."""
        return self._http("model versions", "GET", f"api/projects/{project}/model-versions").json()

    def live_model_versions(self, project: int) -> JSON:
        """The model versions Label Studio offers in Settings > Annotation, with each ML backend's live state
        (e.g. "roi-backend (Training)" right after Start Training); read without refreshing the state."""
        params = {"extended": "true", "include_live_models": "true"}
        return self._http(
            "model versions", "GET", f"api/projects/{project}/model-versions", params=params
        ).json()

    # Tasks, storage, predictions, annotations

    def import_tasks(self, project: int, tasks: Sequence[JSON]) -> list[int]:
        """Import tasks (`{"data": ..., "predictions": [...]}`); returns the new task ids in order."""
        with translated_errors(f"import tasks into project {project}"):
            response = self.sdk.projects.import_tasks(id=project, request=list(tasks), return_task_ids=True)
        return list(response.task_ids or [])

    def add_local_storage(
        self, project: int, path: Path | str, title: str, regex_filter: str | None = None
    ) -> int:
        """A Local Files import storage for `path` (under LS's LOCAL_FILES_DOCUMENT_ROOT); returns its id.

        LS serves /data/local-files/?d=... only for folders that such a storage covers (404 otherwise).
        """
        with translated_errors(f"add local storage {path}"):
            storage = self.sdk.import_storage.local.create(
                project=project,
                path=str(Path(path).resolve()),
                title=title,
                use_blob_urls=True,
                **({"regex_filter": regex_filter} if regex_filter else {}),
            )
        return storage.id

    def get_tasks(self, project: int, task_ids: Sequence[int] | None = None) -> list[JSON]:
        """Tasks with their annotations, predictions and drafts, as LS's JSON, in id order.

        The task list, not GET /api/tasks/{id}: opening a single task makes LS call the ML backend. The ids
        go TASKS_PER_PAGE at a time, one page per request, so the URL stays short for any selection and no
        page past the last is asked for (LS answers that with 404 "Invalid page" and logs a traceback).
        """
        if task_ids is None:
            return self._task_pages(project, None)
        ids = list(dict.fromkeys(task_ids))
        tasks = []
        for start in range(0, len(ids), TASKS_PER_PAGE):
            tasks += self._task_pages(project, ids[start : start + TASKS_PER_PAGE])
        return sorted(tasks, key=lambda task: task["id"])

    def _task_pages(self, project: int, task_ids: list[int] | None) -> list[JSON]:
        params: dict[str, Any] = {"project": project, "fields": "all", "page_size": TASKS_PER_PAGE}
        if task_ids is not None:
            # LS reads a selection only from `query` (the SDK's own `selected_items` parameter is ignored).
            params["query"] = json.dumps({"selectedItems": {"all": False, "included": task_ids}})
        tasks: list[JSON] = []
        for page in itertools.count(1):
            reply = self._http(
                f"get tasks of project {project}", "GET", "api/tasks/", params={**params, "page": page}
            )
            body = reply.json()
            tasks += body.get("tasks") or []
            if len(tasks) >= int(body.get("total") or 0) or not body.get("tasks"):
                return sorted(tasks, key=lambda task: task["id"])

    def annotated_task_ids(self, project: int) -> Iterator[int]:
        """Ids of the project's tasks with at least one annotation, page by page (read only as far as asked)."""
        has_annotations = {
            "conjunction": "and",
            "items": [
                {
                    "filter": "filter:tasks:total_annotations",
                    "operator": "greater",
                    "type": "Number",
                    "value": 0,
                }
            ],
        }
        params = {"project": project, "fields": "task_only", "page_size": TASKS_PER_PAGE}
        params["query"] = json.dumps({"filters": has_annotations})
        seen = 0
        for page in itertools.count(1):
            body = self._http(
                f"list annotated tasks of project {project}",
                "GET",
                "api/tasks/",
                params={**params, "page": page},
            ).json()
            tasks = body.get("tasks") or []
            yield from (task["id"] for task in tasks)
            seen += len(tasks)
            if not tasks or seen >= int(body.get("total") or 0):
                return

    def create_prediction(self, task: int, result: list[JSON], score: float, model_version: str) -> int:
        with translated_errors(f"create prediction for task {task}"):
            return self.sdk.predictions.create(
                task=task, result=result, score=score, model_version=model_version
            ).id

    def predictions(self, task: int) -> list[JSON]:
        """The stored predictions of a task (each with its model_version and score)."""
        with translated_errors(f"list predictions of task {task}"):
            return [_plain(prediction) for prediction in self.sdk.predictions.list(task=task)]

    def create_annotation(self, task: int, result: list[JSON], **fields: Any) -> int:
        """Annotate a task like an annotator does (for tests); `fields`: parent_prediction, lead_time, ..."""
        with translated_errors(f"create annotation for task {task}"):
            return self.sdk.annotations.create(id=task, result=result, **fields).id

    def update_annotation(self, annotation: int, result: list[JSON], **fields: Any) -> JSON:
        with translated_errors(f"update annotation {annotation}"):
            return _plain(self.sdk.annotations.update(id=annotation, result=result, **fields))

    def export_json(self, project: int, all_tasks: bool = False) -> list[JSON]:
        """The project's full JSON export (not JSON_MIN, which loses the box-caption link).

        Only annotated tasks unless `all_tasks`.
        """
        with translated_errors(f"export project {project}"):
            chunks = self.sdk.projects.exports.download_sync(
                project, export_type="JSON", download_all_tasks=all_tasks
            )
            data = b"".join(chunks)
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as error:
            raise LabelStudioError(
                f"export project {project}", 200, f"not readable JSON ({str(error)[:200]})"
            ) from None

    # ML backends

    def connect_ml_backend(
        self, project: int, url: str, title: str, interactive: bool = True, **fields: Any
    ) -> int:
        """Register an ML backend with a project (LS calls its /health and /setup); returns the backend id.

        `fields` go to the SDK's ml.create: extra_params, auth_method, basic_auth_user, ...
        """
        with translated_errors(f"connect ML backend {url}"):
            return self.sdk.ml.create(
                project=project, url=url, title=title, is_interactive=interactive, **fields
            ).id

    def interactive_annotating(self, ml_backend: int, task: int, context_result: list[JSON]) -> JSON:
        """What the labeling UI does after a smart-tool drawing: LS asks the backend's /predict.

        Returns LS's reply: `{"data": {"result": [...], ...}}`, or `{"errors": [...]}` (HTTP 200)
        when the backend failed or timed out.
        """
        with translated_errors(f"interactive annotating of task {task}"):
            response = self.sdk.ml.with_raw_response.predict_interactive(
                ml_backend, task=task, context={"result": list(context_result)}
            )
        return response.response.json()

    def retrieve_predictions(self, project: int, task_ids: Sequence[int] | None = None) -> JSON:
        """The Data Manager's "Retrieve Predictions": LS sends the tasks to the backend's /predict in one call.

        All tasks of the project unless `task_ids`; returns LS's reply.
        """
        selected = (
            {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": list(task_ids)}
        )
        with translated_errors(f"retrieve predictions for project {project}"):
            response = self.sdk.actions.with_raw_response.create(
                id="retrieve_tasks_predictions", project=project, selected_items=selected
            )
        return response.response.json()

    def start_training(self, ml_backend: int) -> None:
        """The "Start Training" button: LS posts START_TRAINING to the backend's /webhook."""
        with translated_errors(f"start training of ML backend {ml_backend}"):
            self.sdk.ml.train(ml_backend)
