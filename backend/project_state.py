"""Per-project state in Redis: the settings of the last /setup, and the annotation counters.

gunicorn runs several backend processes, so whatever one process learns from Label Studio (the extra params
of /setup, the annotation webhooks) is kept in Redis for all of them and for the workers:

* ``roi:project:<id>:setup``: JSON ``{"settings", "hostname", "updated_at"}`` from the last /setup, where
  "settings" is the project's roi_contract.project.ProjectSettings. The access token of /setup is not
  stored (it is the project creator's legacy token; the workers use LABEL_STUDIO_API_KEY).
* ``roi:project:<id>:stats``: a hash of counters: annotation events, and curated annotations (the count the
  every-N-annotations training trigger reads).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from roi_contract.project import ProjectSettings

PREFIX = "roi:project:"
EVENT_FIELDS = ("annotations_created", "annotations_updated", "annotations_deleted")
STAT_FIELDS = (*EVENT_FIELDS, "curated")


def parse_project_id(value: Any) -> int:
    """Label Studio's project reference as an id: "<id>.<created_at>" in /setup and /predict, an int in webhooks."""
    text = str(value).split(".", 1)[0] if isinstance(value, str | int) and not isinstance(value, bool) else ""
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise ValueError(f"project must be a project id or '<id>.<created_at>', got {str(value)[:80]!r}")
    return int(text)


def _key(project_id: int, part: str) -> str:
    return f"{PREFIX}{project_id}:{part}"


def save_setup(
    connection: redis.Redis, project_id: int, settings: ProjectSettings, hostname: str | None
) -> None:
    record = {"settings": settings.model_dump(mode="json"), "hostname": hostname, "updated_at": time.time()}
    connection.set(_key(project_id, "setup"), json.dumps(record))


def known_projects(connection: redis.Redis) -> list[int]:
    """The projects that ran /setup, i.e. every project connected to this backend."""
    keys = connection.scan_iter(match=f"{PREFIX}*:setup", count=500)
    return sorted(int(key.decode().removeprefix(PREFIX).split(":")[0]) for key in keys)


def load_settings(connection: redis.Redis, project_id: int) -> ProjectSettings:
    """The settings of the project's last /setup; the defaults when there was none."""
    value = connection.get(_key(project_id, "setup"))
    if value is None:
        return ProjectSettings()
    return ProjectSettings.model_validate(json.loads(value)["settings"])


def count_event(
    connection: redis.Redis, project_id: int, event: str, *, curated: bool, amount: int = 1
) -> int:
    """Count an annotation event; returns the project's curated total when `curated`, else 0."""
    with connection.pipeline() as pipe:
        pipe.hincrby(_key(project_id, "stats"), event, amount)
        if curated:
            pipe.hincrby(_key(project_id, "stats"), "curated", 1)
        counts = pipe.execute()
    return int(counts[1]) if curated else 0


def project_stats(connection: redis.Redis, project_id: int) -> dict[str, int]:
    """Every counter of `STAT_FIELDS`, 0 when never counted."""
    counters = connection.hgetall(_key(project_id, "stats"))
    values = {key.decode(): int(value) for key, value in counters.items()}
    return {name: values.get(name, 0) for name in STAT_FIELDS}


def record_training_refusal(connection: redis.Redis, project_id: int, reason: str | None) -> None:
    """Keep why the project's last Start Training was refused (None: it was not), for its training status."""
    key = _key(project_id, "training_refusal")
    if reason is None:
        connection.delete(key)
    else:
        connection.set(key, json.dumps({"reason": reason, "at": time.time()}), ex=7 * 24 * 3600)


def training_refusal(connection: redis.Redis, project_id: int) -> dict | None:
    value = connection.get(_key(project_id, "training_refusal"))
    return json.loads(value) if value else None
