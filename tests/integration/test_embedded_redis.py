"""devstack.redis_server: a real redis-server process, with production persistence settings, and restarts."""

from __future__ import annotations

import socket

import pytest
import redis

from devstack.redis_server import EmbeddedRedis, RedisServerError


def answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1, retry=None)
    try:
        return client.ping()
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def test_the_server_runs_with_the_production_persistence_settings(redis_server):
    client = redis.Redis.from_url(redis_server.url)

    assert client.ping()
    assert redis_server.url.startswith("redis://127.0.0.1:")
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("protected-mode") == {"protected-mode": "yes"}
    assert client.config_get("bind") == {"bind": "127.0.0.1"}
    assert client.config_get("dir") == {"dir": str(redis_server.data_dir)}


def test_stop_and_start_keep_the_data_and_the_port(redis_server, redis_conn):
    redis_conn.set("job", "queued")
    url, first_pid = redis_server.url, redis_server.pid

    redis_server.stop()
    assert not redis_server.running
    assert not answers(url)
    redis_server.start()

    assert redis_server.url == url
    assert redis_server.pid != first_pid
    assert redis_conn.get("job") == b"queued"  # the same client reconnects to the restarted server
    aof = list(redis_server.data_dir.glob("appendonly*"))
    assert aof, "no append-only file in the data directory"
    assert not (redis_server.data_dir / "dump.rdb").exists()


def test_start_fails_clearly_when_the_port_is_taken(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = EmbeddedRedis(tmp_path / "redis", port=squatter.getsockname()[1], start_timeout_s=5)

        with pytest.raises(RedisServerError, match="exited with code"):
            server.start()
    assert not server.running


def test_starting_twice_is_an_error(redis_server):
    with pytest.raises(RedisServerError, match="already running"):
        redis_server.start()


def test_kill_is_a_crash_and_the_server_comes_back(redis_server, redis_conn):
    redis_server.kill()
    assert not redis_server.running
    redis_server.start()

    assert redis_conn.ping()
