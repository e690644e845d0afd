"""What the workers tell the backend through Redis: who is alive, and which models exist.

A worker writes its heartbeat key every few seconds with a short expiry; the backend's /health
lists the keys that have not expired (RQ's own worker registry outlives a killed worker by
minutes). The model registry lives on the workers' disk, so a worker also publishes a snapshot
of it (current version and version cards) for the backend's /setup and /versions.
"""

from __future__ import annotations

import json
import time

import redis

PREFIX = "roi:worker:"
REGISTRY_KEY = "roi:registry"
INTERVAL_S = 5.0
TTL_S = 20  # several missed beats before a worker counts as gone


def beat(connection: redis.Redis, worker_name: str, info: dict) -> None:
    """Record that `worker_name` is alive; `info` holds at least model_version and queues."""
    payload = {**info, "name": worker_name, "updated_at": time.time()}
    connection.set(PREFIX + worker_name, json.dumps(payload), ex=TTL_S)


def forget(connection: redis.Redis, worker_name: str) -> None:
    connection.delete(PREFIX + worker_name)


def live_workers(connection: redis.Redis) -> list[dict]:
    """The heartbeats that have not expired, sorted by worker name."""
    keys = sorted(connection.scan_iter(match=PREFIX + "*", count=100))
    values = connection.mget(keys) if keys else []
    return [json.loads(value) for value in values if value is not None]


def publish_registry(connection: redis.Redis, current: str | None, versions: list[dict]) -> None:
    """The registry as the worker sees it: the served version and every version's card."""
    connection.set(
        REGISTRY_KEY, json.dumps({"current": current, "versions": versions, "updated_at": time.time()})
    )


def registry_snapshot(connection: redis.Redis) -> dict:
    """The last published registry snapshot; no current version when no worker has published one."""
    value = connection.get(REGISTRY_KEY)
    return json.loads(value) if value else {"current": None, "versions": [], "updated_at": None}
