"""The model registry as the workers see it, published in Redis for the backend.

The registry lives on the workers' disk (worker/registry.py); the backend's /setup and /versions cannot
read it, so every worker that loads a version (and every fine-tuning run) publishes a snapshot: the served
version, every version's card, and per project with an adapter lineage the version its predictions carry
("<base>+p<project>-<adapter>"; a project not listed is served the base).
"""

from __future__ import annotations

import json
import time

import redis

REGISTRY_KEY = "roi:registry"


def publish(
    connection: redis.Redis, current: str | None, versions: list[dict], projects: dict[str, str] | None = None
) -> None:
    """The registry as the worker sees it: the served version, every version's card, the projects' versions."""
    connection.set(
        REGISTRY_KEY,
        json.dumps(
            {"current": current, "versions": versions, "projects": projects or {}, "updated_at": time.time()}
        ),
    )


def project_version(snapshot: dict, project: int | None) -> str | None:
    """The version `project` is served in a snapshot: its adapter's, else the base (the current version)."""
    if project is not None and snapshot.get("current"):
        return (snapshot.get("projects") or {}).get(str(project), snapshot["current"])
    return snapshot.get("current")


def read(connection: redis.Redis) -> dict:
    """The last published registry snapshot; no current version when no worker has published one."""
    value = connection.get(REGISTRY_KEY)
    return (
        json.loads(value) if value else {"current": None, "versions": [], "projects": {}, "updated_at": None}
    )
