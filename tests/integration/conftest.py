"""Fixtures for the integration tests: a real redis-server per test, clients for it, and real worker processes.

* `redis_server`: an EmbeddedRedis (AOF in tmp_path), started; stop()/start()/kill() it to test outages.
* `redis_conn`: a client from backend.queues.connect, the way the backend and the worker connect.
* `start_process`: start any command as a devstack ManagedProcess with its output in a file; every
  process still running at the end of the test is stopped (SIGTERM, then SIGKILL).
* `wait_until`: poll a condition with a deadline (tests synchronise on conditions, never on sleeps).
* `start_rq_worker`: a plain RQ SimpleWorker on the test Redis, with the project's serializer; it can run
  the functions of tests/integration/jobs_for_tests.py (`JOBS`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis

from backend.queues import PRIORITY_ORDER, SERIALIZER, connect
from backend.settings import Settings
from devstack.label_studio import LabelStudio, copy_data_template, ensure_venv
from devstack.processes import ManagedProcess
from devstack.redis_server import EmbeddedRedis
from tests import waiting

REPO_ROOT = Path(__file__).resolve().parents[2]
JOBS = "tests.integration.jobs_for_tests"


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """wait_until(condition, timeout_s=10, message=...): poll until truthy (returned), fail the test at the deadline."""
    return waiting.wait_until


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
def start_process(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """start_process(*argv, env=None, name=...): a devstack ManagedProcess in the repository root, its whole
    output in a file (`recorded()`); every process still running at the end of the test is stopped."""
    started: list[ManagedProcess] = []

    def start(*argv: str, env: dict[str, str] | None = None, name: str = "process") -> ManagedProcess:
        child = ManagedProcess(
            name,
            argv,
            env={"PYTHONPATH": str(REPO_ROOT), **(env or {})},
            cwd=REPO_ROOT,
            sink=lambda line: None,
            record=tmp_path / f"{name}-{len(started)}.log",
        ).start()
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


@pytest.fixture
def start_rq_worker(
    redis_server: EmbeddedRedis, start_process: Callable[..., ManagedProcess]
) -> Callable[..., ManagedProcess]:
    def start(queues: Sequence[str] = PRIORITY_ORDER, *extra_args: str) -> ManagedProcess:
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


# --- the region worker (worker.main) -------------------------------------------------------------------
# Model code is imported inside the fixtures: the tests that do not start a region worker never load torch.


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random region-LLM directory, built once per session."""
    from tests.integration.worker_harness import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture
def model_registry(tmp_path: Path, tiny_model_dir: Path):
    """A model registry (MODEL_DIR) serving the tiny model as version "v1"."""
    from worker.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "models")
    registry.import_model(tiny_model_dir, version="v1")
    return registry


@pytest.fixture
def worker_files(tmp_path: Path) -> Path:
    """The workers' ROI_LOCAL_FILES_ROOT, holding worker_harness.IMAGE."""
    from tests.integration.worker_harness import write_scene

    write_scene(tmp_path / "files")
    return tmp_path / "files"


@pytest.fixture
def image_server():
    """An HTTP image server on loopback that the workers may fetch from (see worker_harness.ImageServer)."""
    from tests.integration.worker_harness import ImageServer

    with ImageServer() as server:
        yield server


class WorkerLauncher:
    """Starts `python -m worker.main` processes on the test Redis (the `start_worker` fixture).

    Heartbeats every 0.5 s (a job's lease is 6 s) and maintenance every second, so the job of a killed
    worker is re-queued within seconds. LOG_LEVEL=INFO: one JSON line per job execution.
    """

    def __init__(self, start_process, connection: redis.Redis, env: dict[str, str]) -> None:
        self.start_process = start_process
        self.connection = connection
        self.env = env

    def __call__(
        self, name: str = "w1", *flags: str, env: dict[str, str] | None = None, ready: bool = True
    ) -> ManagedProcess:
        """Start worker `name`; with `ready`, return once its heartbeat says "idle"."""
        child = self.start_process(
            sys.executable, "-m", "worker.main",
            "--name", name, "--device", "cpu",
            "--heartbeat-interval", "0.5", "--maintenance-interval", "1",
            *flags,
            env={**self.env, **(env or {})},
            name=name,
        )  # fmt: skip
        if ready:
            self.wait_ready(name, child)
        return child

    def many(
        self, *names: str, flags: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> dict[str, ManagedProcess]:
        """Start several workers at once and wait until all are ready."""
        children = {name: self(name, *flags, env=env, ready=False) for name in names}
        for name, child in children.items():
            self.wait_ready(name, child)
        return children

    def wait_ready(self, name: str, child: ManagedProcess, timeout_s: float = 120.0) -> None:
        from backend.heartbeats import live_workers

        deadline = time.monotonic() + timeout_s
        while not any(w["name"] == name and w["state"] == "idle" for w in live_workers(self.connection)):
            if not child.running or time.monotonic() > deadline:
                pytest.fail(f"worker {name} did not become ready; its log:\n{child.recorded()[-3000:]}")
            time.sleep(0.05)


@pytest.fixture
def start_worker(
    redis_server: EmbeddedRedis,
    redis_conn: redis.Redis,
    start_process: Callable[..., ManagedProcess],
    model_registry,
    worker_files: Path,
    image_server,
) -> WorkerLauncher:
    """start_worker(name, *flags, env=None, ready=True) and start_worker.many(*names): see WorkerLauncher."""
    env = {
        "REDIS_URL": redis_server.url,
        "MODEL_DIR": str(model_registry.root),
        "ROI_LOCAL_FILES_ROOT": str(worker_files),
        "ROI_IMAGE_ALLOWED_HOSTS": image_server.host,
        "LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        # Workers and tests share two cores: OpenMP threads spinning against each other make the tiny
        # model 10-20 times slower than one thread each.
        "OMP_NUM_THREADS": "1",
    }
    return WorkerLauncher(start_process, redis_conn, env)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    venv = ensure_venv(REPO_ROOT / ".cache" / "label-studio")
    root = tmp_path_factory.mktemp("label-studio")
    copy_data_template(venv, root / "data")
    with LabelStudio(root / "data", root / "files", venv=venv) as server:
        yield server
