"""What the workers tell the backend through Redis: who is alive, and which models exist.

A worker records a heartbeat every few seconds; the backend's /health lists the workers heard
from recently (RQ's own worker registry outlives a killed worker by minutes). The model registry lives on the workers' disk, so a worker also publishes a snapshot
of it (current version and version cards) for the backend's /setup and /versions.
"""

from __future__ import annotations

import json
import time

import redis

WORKERS_KEY = "roi:workers"  # hash: worker name -> its last heartbeat (JSON)
SEEN_KEY = "roi:workers:seen"  # sorted set: worker name -> time of its last heartbeat
REGISTRY_KEY = "roi:registry"
INTERVAL_S = 5.0
TTL_S = 20  # several missed beats before a worker counts as gone


def beat(connection: redis.Redis, worker_name: str, info: dict) -> None:
    """Record that `worker_name` is alive; `info` holds at least model_version and queues."""
    now = time.time()
    payload = {**info, "name": worker_name, "updated_at": now}
    with connection.pipeline() as pipe:
        pipe.hset(WORKERS_KEY, worker_name, json.dumps(payload))
        pipe.zadd(SEEN_KEY, {worker_name: now})
        pipe.execute()


def forget(connection: redis.Redis, worker_name: str) -> None:
    with connection.pipeline() as pipe:
        pipe.hdel(WORKERS_KEY, worker_name)
        pipe.zrem(SEEN_KEY, worker_name)
        pipe.execute()


def live_workers(connection: redis.Redis) -> list[dict]:
    """The workers heard from within TTL_S, sorted by name (two reads, whatever the keyspace holds)."""
    names = sorted(name.decode() for name in connection.zrangebyscore(SEEN_KEY, time.time() - TTL_S, "+inf"))
    values = connection.hmget(WORKERS_KEY, names) if names else []
    return [json.loads(value) for value in values if value is not None]


def is_alive(connection: redis.Redis, worker_name: str) -> bool:
    seen = connection.zscore(SEEN_KEY, worker_name)
    return seen is not None and seen > time.time() - TTL_S


def prune(connection: redis.Redis) -> None:
    """Drop workers gone for longer than TTL_S (a worker calls this now and then)."""
    gone = connection.zrangebyscore(SEEN_KEY, "-inf", time.time() - TTL_S)
    if gone:
        forget_all = connection.pipeline()
        forget_all.hdel(WORKERS_KEY, *gone)
        forget_all.zrem(SEEN_KEY, *gone)
        forget_all.execute()


def publish_registry(connection: redis.Redis, current: str | None, versions: list[dict]) -> None:
    """The registry as the worker sees it: the served version and every version's card."""
    connection.set(
        REGISTRY_KEY, json.dumps({"current": current, "versions": versions, "updated_at": time.time()})
    )


def registry_snapshot(connection: redis.Redis) -> dict:
    """The last published registry snapshot; no current version when no worker has published one."""
    value = connection.get(REGISTRY_KEY)
    return json.loads(value) if value else {"current": None, "versions": [], "updated_at": None}
