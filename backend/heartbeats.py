"""Which workers are alive: each records a heartbeat every few seconds in Redis.

The backend's /health lists the workers heard from recently (RQ's own worker registry outlives a killed
worker by minutes). Every beat also drops the entries of workers gone for longer than TTL_S, so a fleet
whose machines come and go leaves nothing behind.
"""

from __future__ import annotations

import json
import time

import redis

WORKERS_KEY = "roi:workers"  # hash: worker name -> its last heartbeat (JSON)
SEEN_KEY = "roi:workers:seen"  # sorted set: worker name -> time of its last heartbeat
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
    """Drop workers gone for longer than TTL_S (every worker's pulse calls this after its beat)."""
    gone = connection.zrangebyscore(SEEN_KEY, "-inf", time.time() - TTL_S)
    if gone:
        forget_all = connection.pipeline()
        forget_all.hdel(WORKERS_KEY, *gone)
        forget_all.zrem(SEEN_KEY, *gone)
        forget_all.execute()
