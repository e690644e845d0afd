"""The model registry as the workers see it, published in Redis for the backend.

The registry lives on the workers' disk (worker/registry.py); the backend's /setup and /versions cannot
read it, so every worker that loads a version (and every fine-tuning run) publishes a snapshot: the served
version and every version's card.
"""

from __future__ import annotations

import json
import time

import redis

REGISTRY_KEY = "roi:registry"


def publish(connection: redis.Redis, current: str | None, versions: list[dict]) -> None:
    """The registry as the worker sees it: the served version and every version's card."""
    connection.set(
        REGISTRY_KEY, json.dumps({"current": current, "versions": versions, "updated_at": time.time()})
    )


def read(connection: redis.Redis) -> dict:
    """The last published registry snapshot; no current version when no worker has published one."""
    value = connection.get(REGISTRY_KEY)
    return json.loads(value) if value else {"current": None, "versions": [], "updated_at": None}
