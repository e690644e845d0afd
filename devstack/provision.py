"""What the demo, the end-to-end tests and the benchmarks set up in a running stack; every step idempotent.

A second `make demo` on the same state finds what the first one made and reuses it:

* `import_model`: a model directory enters the registry once (recognised by the digest of its files) and
  is served from then on; importing the same directory again changes nothing, so a version promoted
  later (fine-tuning) stays served.
* `ensure_world`: the synthetic world (images, data.jsonl with the true answers) and its tasks.json are generated
  once per (size, seed, values left out) below Label Studio's local-files root, its image URLs relative to
  that root. `held_back` reads which values a model never saw (its card.json), to leave them out too.
* `ensure_project`: the project (found by title), a Local Files storage for the world's images (without it
  Label Studio answers 404 for them), the tasks, and our backend as its interactive ML backend (its URL
  updated when the backend moved to another port).
* `prelabel`: "Retrieve predictions" for the tasks that have no prediction of the served model version
  yet, then wait until every task has one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from backend.ls_client import JSON, LabelStudioClient, translated_errors
from devstack.world_tasks import TASKS_FILE, label_studio_rectangle, write_tasks
from roi_model.synthetic import WORLD_VERSION, generate_world
from worker.registry import CARD_FILE, ModelRegistry, card_version

log = logging.getLogger(__name__)

LOCAL_FILES_PREFIX = "/data/local-files/?d="
BACKEND_TITLE = "roi-backend"
_WORLD_STAMP = ".complete"


class ProvisionError(RuntimeError):
    """A set-up step cannot be done; the message says why and what to do."""


# --- the model --------------------------------------------------------------------------------------


def directory_digest(folder: Path) -> str:
    """sha256 over the relative paths and contents of every file below `folder`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def import_model(registry_root: Path, source: Path) -> str:
    """Serve the model directory `source` from the registry at `registry_root`; returns the served version.

    A directory imported before (same files) is not imported again and the served version is left as it
    is. A new one is published (under the version its card.json names, when that name is free) and promoted.
    """
    source = Path(source)
    if not (source / "config.json").is_file():
        raise ProvisionError(f"{source} is not a model directory: it has no config.json")
    registry = ModelRegistry(registry_root)
    digest = directory_digest(source)
    known = next((card for card in registry.versions() if card.get("source_digest") == digest), None)
    if known is not None:
        if registry.current() is None:
            registry.promote(known["version"])
        return registry.current() or known["version"]
    wanted = card_version(source)
    taken = {card["version"] for card in registry.versions()}
    version = registry.import_model(
        source,
        version=wanted if wanted and wanted not in taken else None,
        extra={"source_digest": digest, "imported_from": str(source.resolve())},
    )
    registry.promote(version)
    log.info("imported %s as model version %s", source, version)
    return version


# --- the synthetic world ----------------------------------------------------------------------------


def held_back(model_dir: Path) -> dict[str, set[str]]:
    """The attribute values a model never saw in training, from its card.json ({} when it names none).

    The demo model's world keeps purple back on purpose (fine-tuning teaches it), so a world meant to
    show that model's answers leaves out the same values.
    """
    try:
        card = json.loads((Path(model_dir) / CARD_FILE).read_text())
        excluded = card["training"]["train_world"].get("exclude") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return {attribute: set(values) for attribute, values in excluded.items()}


def ensure_world(
    files_root: Path, name: str, images: int, seed: int, exclude: Mapping[str, set[str]] | None = None
) -> Path:
    """The world `files_root/name`, generated unless a complete one of this size, seed and exclusion is there.

    `exclude` leaves attribute values out, as roi_model.synthetic.generate_world does.
    """
    folder = Path(files_root) / name
    url_prefix = f"{LOCAL_FILES_PREFIX}{name}/"
    excluded = {attribute: sorted(values) for attribute, values in sorted((exclude or {}).items())}
    wanted = json.dumps(
        {
            "images": images,
            "seed": seed,
            "exclude": excluded,
            "url_prefix": url_prefix,
            "world": WORLD_VERSION,
        }
    )
    stamp = folder / _WORLD_STAMP
    if stamp.is_file() and stamp.read_text() == wanted:
        return folder
    stamp.unlink(missing_ok=True)
    generate_world(folder, images, seed, exclude=exclude)
    write_tasks(folder, url_prefix=url_prefix)
    stamp.write_text(wanted)
    return folder


def world_tasks(world: Path) -> list[JSON]:
    """The world's Label Studio tasks: the image URL, the record id, the boxes as a prediction."""
    return json.loads((Path(world) / TASKS_FILE).read_text())


def world_records(world: Path) -> dict[str, JSON]:
    """The world's records by id: regions (pixel boxes), objects (their true attributes), conversations."""
    lines = (Path(world) / "data.jsonl").read_text().splitlines()
    return {record["id"]: record for record in map(json.loads, lines)}


def drawn_rectangle(record: JSON, index: int, region_id: str) -> JSON:
    """The record's index-th object boxed as the labeling UI sends a freshly drawn rectangle."""
    rectangle = label_studio_rectangle(record["regions"][index], record["width"], record["height"], region_id)
    return {**rectangle, "origin": "manual"}


# --- the project ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectSetup:
    project: int
    ml_backend: int
    task_ids: list[int]
    created: bool  # False: an existing project was reused


def ensure_project(
    client: LabelStudioClient,
    title: str,
    label_config: str,
    images: Path,
    tasks: Sequence[JSON],
    backend_url: str,
) -> ProjectSetup:
    """The project `title` with its image storage, its tasks and our backend connected (interactive)."""
    project = client.find_project_by_title(title)
    created = project is None
    if project is None:
        project = client.create_project(title, label_config)
    ensure_local_storage(client, project, images)
    task_ids = [task["id"] for task in client.get_tasks(project)]
    if not task_ids:
        task_ids = client.import_tasks(project, tasks)
    elif len(task_ids) != len(tasks):
        raise ProvisionError(
            f"project {title!r} (id {project}) has {len(task_ids)} tasks where {len(tasks)} were imported; "
            "delete the project in Label Studio (or the state folder) to start afresh"
        )
    ml_backend = ensure_ml_backend(client, project, backend_url)
    return ProjectSetup(project, ml_backend, task_ids, created)


def ensure_local_storage(client: LabelStudioClient, project: int, folder: Path) -> int:
    path = str(Path(folder).resolve())
    with translated_errors(f"list the local storages of project {project}"):
        storages = client.sdk.import_storage.local.list(project=project)
    for storage in storages:
        if storage.path == path:
            return storage.id
    return client.add_local_storage(project, path, title=Path(folder).name)


def ensure_ml_backend(client: LabelStudioClient, project: int, url: str) -> int:
    """Our backend as the project's interactive ML backend; an earlier one is pointed at `url`."""
    with translated_errors(f"list the ML backends of project {project}"):
        backends = client.sdk.ml.list(project=project)
    for backend in backends:
        if backend.url.rstrip("/") == url.rstrip("/"):
            return backend.id
    if backends:
        # Label Studio asks the first backend of a project for predictions: move it rather than add one.
        # `project` must be sent along: without it LS 1.23.2 fails the update with HTTP 500 (its /setup
        # check calls MLBackend.setup_ without a project).
        backend = backends[0]
        with translated_errors(f"point ML backend {backend.id} at {url}"):
            client.sdk.ml.update(backend.id, url=url, is_interactive=True, project=project)
        return backend.id
    return client.connect_ml_backend(project, url, title=BACKEND_TITLE, interactive=True)


# --- predictions ------------------------------------------------------------------------------------


def has_prediction(task: JSON, model_version: str) -> bool:
    return any(p.get("model_version") == model_version for p in task.get("predictions") or [])


def prelabel(
    client: LabelStudioClient,
    project: int,
    model_version: str,
    *,
    timeout_s: float = 600.0,
    progress: Callable[[int, int], None] | None = None,
    task_ids: Sequence[int] | None = None,
    ask_again_s: float = 30.0,
    poll_s: float = 1.0,
) -> list[JSON]:
    """Have the backend predict every task (or `task_ids`) that lacks a `model_version` prediction.

    Waits until each has one and returns the tasks; the project then shows that version's predictions
    in the labeling UI. `progress(done, total)` is called whenever the count changes. Tasks still without
    a prediction are asked for again every `ask_again_s`: the backend answers a small selection inline
    within its predict timeout, and Label Studio stores nothing for a task whose answer came too late
    (asked again, the backend hands over the finished answer).
    """
    deadline = time.monotonic() + timeout_s
    asked_at, reported = None, -1
    while True:
        tasks = client.get_tasks(project, task_ids)
        missing = [task["id"] for task in tasks if not has_prediction(task, model_version)]
        done = len(tasks) - len(missing)
        if progress is not None and done != reported:
            progress(done, len(tasks))
            reported = done
        if not missing:
            break
        if time.monotonic() > deadline:
            raise ProvisionError(
                f"after {timeout_s:g} s only {done} of {len(tasks)} tasks of project {project} have a "
                f"prediction of model {model_version}; the worker's log says why"
            )
        if asked_at is None or time.monotonic() - asked_at >= ask_again_s:
            client.retrieve_predictions(project, missing)
            asked_at = time.monotonic()
            continue
        time.sleep(poll_s)
    # Without this the labeling UI shows the predictions of the project's first model version (the boxes).
    with translated_errors(f"set the model version of project {project}"):
        client.sdk.projects.update(id=project, model_version=model_version)
    return tasks
