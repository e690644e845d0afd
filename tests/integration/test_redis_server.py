"""backend.redis_server: a real redis-server process, restarts, and the shared development server."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import redis

from backend.redis_server import (
    URL_FILE,
    EmbeddedRedis,
    RedisServerError,
    ensure_redis_url,
    free_port,
    recorded_url,
    stop_owned_servers,
)
from backend.settings import Settings


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


def test_redis_url_from_the_settings_wins_and_starts_nothing(tmp_path):
    settings = Settings(redis_url="redis://redis.internal:6379/2", redis_data_dir=tmp_path / "redis")

    assert ensure_redis_url(settings) == "redis://redis.internal:6379/2"
    assert not (tmp_path / "redis").exists()


# One process of the checkout starts the development Redis and owns it; others reuse it.
OWNER = textwrap.dedent(
    """
    import sys
    from backend.redis_server import ensure_redis_url
    from backend.settings import Settings
    print(ensure_redis_url(Settings(redis_data_dir=sys.argv[1])), flush=True)
    sys.stdin.readline()  # keep the server until the test says so
    """
)
USER = textwrap.dedent(
    """
    import sys
    from backend.redis_server import ensure_redis_url
    from backend.settings import Settings
    print(ensure_redis_url(Settings(redis_data_dir=sys.argv[1])))
    """
)


def test_other_processes_reuse_the_owners_server_which_stops_when_the_owner_exits(tmp_path):
    data_dir = tmp_path / "redis"
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(data_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        url = owner.stdout.readline().strip()
        assert answers(url)
        assert (data_dir / URL_FILE).read_text().strip() == url

        user = subprocess.run(
            [sys.executable, "-c", USER, str(data_dir)], capture_output=True, text=True, timeout=60
        )
        assert user.returncode == 0, user.stderr
        assert user.stdout.strip() == url
        assert answers(url), "a process that only reused the server must not stop it"
    finally:
        owner.communicate("\n", timeout=30)

    assert owner.returncode == 0
    assert not answers(url)
    assert not (data_dir / URL_FILE).exists()


def test_a_stale_recorded_url_is_replaced_by_a_new_server(tmp_path):
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    (data_dir / URL_FILE).write_text(dead_url + "\n")
    try:
        url = ensure_redis_url(Settings(redis_data_dir=data_dir))

        assert url != dead_url
        assert answers(url)
        assert recorded_url(data_dir) == url
        assert ensure_redis_url(Settings(redis_data_dir=data_dir)) == url  # the same process asks again
    finally:
        stop_owned_servers()
    assert not answers(url)


def test_a_recorded_redis_serving_another_directory_is_not_reused(tmp_path, redis_server):
    data_dir = tmp_path / "other"
    data_dir.mkdir()
    (data_dir / URL_FILE).write_text(redis_server.url)

    assert recorded_url(data_dir) is None


def test_processes_starting_at_the_same_time_share_one_server(tmp_path):
    data_dir = tmp_path / "redis"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", OWNER, str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        urls = {racer.stdout.readline().strip() for racer in racers}
        assert len(urls) == 1, urls
        assert answers(urls.pop())
    finally:
        for racer in racers:
            racer.communicate("\n", timeout=30)
    assert [racer.returncode for racer in racers] == [0, 0]
