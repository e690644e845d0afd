"""Fixtures for the integration tests: a real redis-server per test, clients for it, and real worker processes.

* `redis_server`: an EmbeddedRedis (AOF in tmp_path), started; stop()/start()/kill() it to test outages.
* `redis_conn`: a client from backend.queues.connect, the way the backend and the worker connect.
* `start_process`: start any command as a child process with its output in a log file; every process
  still running at the end of the test is stopped (SIGTERM, then SIGKILL).
* `wait_until`: poll a condition with a deadline (tests synchronise on conditions, never on sleeps).
* `start_rq_worker`: a plain RQ SimpleWorker on the test Redis, with the project's serializer; it can run
  the functions of tests/integration/jobs_for_tests.py (`JOBS`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis

from backend.queues import PRIORITY_ORDER, SERIALIZER, connect
from backend.redis_server import EmbeddedRedis
from backend.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
JOBS = "tests.integration.jobs_for_tests"


class ChildProcess:
    """A child process started by a test, with its stdout and stderr in `log_path`."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        child_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        with open(log_path, "ab") as log_file:
            self.popen = subprocess.Popen(
                self.argv, cwd=REPO_ROOT, env=child_env, stdout=log_file, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM (an RQ worker then finishes its job and exits), SIGKILL after `timeout_s`."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(timeout=timeout_s)

    def kill(self) -> int:
        """SIGKILL, as a crash would."""
        if self.alive():
            self.popen.kill()
        return self.popen.wait(timeout=10)


def _wait_until(
    condition: Callable[[], object], timeout_s: float = 10.0, message: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{message} not met within {timeout_s} s")
        time.sleep(0.02)


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """wait_until(condition, timeout_s=10, message=...): poll until truthy (returned), fail the test at the deadline."""
    return _wait_until


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_settings(redis_server: EmbeddedRedis) -> Settings:
    return Settings(redis_url=redis_server.url)


@pytest.fixture
def redis_conn(redis_settings: Settings) -> Iterator[redis.Redis]:
    connection = connect(redis_settings)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[..., ChildProcess]]:
    started: list[ChildProcess] = []

    def start(*argv: str, env: dict[str, str] | None = None, name: str = "process") -> ChildProcess:
        child = ChildProcess(argv, tmp_path / f"{name}-{len(started)}.log", env=env)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


@pytest.fixture
def start_rq_worker(
    redis_server: EmbeddedRedis, start_process: Callable[..., ChildProcess]
) -> Callable[..., ChildProcess]:
    def start(queues: Sequence[str] = PRIORITY_ORDER, *extra_args: str) -> ChildProcess:
        return start_process(
            sys.executable, "-m", "rq.cli", "worker",
            "--url", redis_server.url,
            "--worker-class", "rq.worker.SimpleWorker",
            "--serializer", f"{SERIALIZER.__module__}.{SERIALIZER.__qualname__}",
            "--path", str(REPO_ROOT),
            *extra_args,
            *queues,
            name="rq-worker",
        )  # fmt: skip

    return start
