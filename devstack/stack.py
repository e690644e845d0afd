"""The whole product on one machine: Redis, a worker, the backend and Label Studio, started together.

`make demo`, the end-to-end tests and the benchmarks start the same processes the same way:

    redis    redis-server on 127.0.0.1 (EmbeddedRedis's command line), data in <state>/redis
    worker   python -m worker.main --queues interactive: the boxes annotators draw, never behind bulk work
    prelabel python -m worker.main --queues interactive,prelabel: bulk pre-labeling (and boxes when idle)
    trainer  python -m worker.main --queues train: fine-tuning, in a process of its own (no model loaded)
    backend  python -m backend.app on 127.0.0.1
    studio   Label Studio (devstack.label_studio.LabelStudio), started here unless already running

Every line they print goes to one sink, prefixed with the process name. `Stack` is a context manager:
leaving the ``with`` block (also on Ctrl-C or an exception) stops what it started, Label Studio first and
Redis last, so nothing loses Redis while it is still running.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import redis
import requests
from rq import Worker

from backend.ls_client import LabelStudioClient
from devstack.label_studio import LabelStudio
from devstack.processes import ManagedProcess, ProcessFailed, ProcessGroup
from devstack.redis_server import EmbeddedRedis, free_port

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# One worker per queue class (name -> queues it serves): a box drawn while a project is pre-labeled or a
# model fine-tuned is answered at once.
WORKERS = {"worker": "interactive", "prelabel": "interactive,prelabel", "trainer": "train"}
Sink = Callable[[str], None]


class LogLines:
    """One output for the lines of several processes: whole lines, each with its process name in front."""

    def __init__(self, write: Sink | None = None) -> None:
        self._write = write or (lambda line: print(line, flush=True))
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self._write(line)

    def prefixed(self, name: str) -> Sink:
        """A sink that writes `name`'s lines the way ProcessGroup writes its processes' lines."""
        prefix = f"{name:<8} | "
        return lambda line: self(prefix + line)


def port_or_free(preferred: int) -> int:
    """`preferred` when nothing listens on it on 127.0.0.1, else a free port the OS picks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As servers do: connections of an earlier run still in TIME_WAIT do not make the port taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


class Stack:
    """Redis, a worker, the backend and (unless it already runs) Label Studio; a context manager.

    `label_studio` must have its port set or be running, because the worker and the backend are started
    with its URL and token before it answers. A process that dies or is not ready within `start_timeout_s`
    raises devstack.processes.ProcessFailed with its last output lines.
    """

    def __init__(
        self,
        state_dir: Path,
        model_dir: Path,
        label_studio: LabelStudio,
        *,
        backend_port: int | None = None,
        lines: LogLines | None = None,
        workers: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.model_dir = Path(model_dir).resolve()
        self.label_studio = label_studio
        self.backend_port = backend_port or free_port()
        self.lines = lines or LogLines()
        self.workers = dict(workers or WORKERS)
        self.extra_env = dict(extra_env or {})
        self.start_timeout_s = start_timeout_s
        run = secrets.token_hex(3)
        self.worker_names = {name: f"stack-{name}-{run}" for name in self.workers}
        self._redis = EmbeddedRedis(self.state_dir / "redis")
        self._group: ProcessGroup | None = None
        self._processes: dict[str, ManagedProcess] = {}
        self._owns_label_studio = False

    @property
    def redis_url(self) -> str:
        return self._redis.url

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    def pid(self, name: str) -> int:
        """The process id of one of the stack's processes ("redis", "backend", or a worker's name)."""
        return self._processes[name].pid

    def client(self) -> LabelStudioClient:
        return LabelStudioClient(self.label_studio.url, self.label_studio.token)

    def redis(self) -> redis.Redis:
        """A new client for the stack's Redis (close it when done)."""
        return redis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5)

    def env(self) -> dict[str, str]:
        """The environment of the worker and the backend (see backend/settings.py)."""
        return {
            "REDIS_URL": self.redis_url,
            "MODEL_DIR": str(self.model_dir),
            "LABEL_STUDIO_URL": self.label_studio.url,
            "LABEL_STUDIO_API_KEY": self.label_studio.token,
            "LOG_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1",
            # One torch thread: on a small machine the worker shares its cores with Label Studio and the
            # backend, and torch's threads then wait on each other at every operation.
            "OMP_NUM_THREADS": "1",
            **self.extra_env,
        }

    # --- starting and stopping -----------------------------------------------------------------------

    def start(self) -> Stack:
        if self._group is not None:
            raise RuntimeError("the stack is already running")
        if not self.label_studio.running and self.label_studio.port is None:
            self.label_studio.port = free_port()
        self._group = ProcessGroup(sink=self.lines).__enter__()
        try:
            self._start_processes()
        except BaseException:  # also Ctrl-C while starting: __exit__ does not run when __enter__ fails
            self.stop()
            raise
        return self

    def _start_processes(self) -> None:
        assert self._group is not None
        self._redis.data_dir.mkdir(parents=True, exist_ok=True)
        redis_process = self._start("redis", self._redis.command())
        redis_process.wait_ready(lambda: self._redis_answers(redis_process.pid), timeout_s=30)

        python = sys.executable
        # The workers and the backend load while Label Studio starts: the slowest overlap.
        workers = {}
        for name, queues in self.workers.items():
            argv = [python, "-m", "worker.main", "--queues", queues, "--model-dir", self.model_dir]
            workers[name] = self._start(name, [*argv, "--name", self.worker_names[name]])
        backend = self._start("backend", [python, "-m", "backend.app", "--port", str(self.backend_port)])
        if not self.label_studio.running:
            self.label_studio.start()
            self._owns_label_studio = True
        for name, worker in workers.items():
            worker.wait_ready(lambda name=name: self._worker_serving(name), timeout_s=self.start_timeout_s)
        backend.wait_ready(self._backend_healthy, timeout_s=self.start_timeout_s)
        log.info("stack ready: backend %s, Label Studio %s", self.backend_url, self.label_studio.url)

    def _start(self, name: str, argv: list) -> ManagedProcess:
        assert self._group is not None
        process = self._group.start(name, argv, env=self.env(), cwd=REPO_ROOT)
        self._processes[name] = process
        return process

    def _redis_answers(self, pid: int) -> bool:
        # Another server may hold the port; only our own process counts.
        with contextlib.closing(redis.Redis.from_url(self.redis_url, socket_timeout=1)) as client:
            return client.info("server")["process_id"] == pid

    def _worker_serving(self, name: str) -> bool:
        # RQ registers the worker once its model is loaded and it listens (its heartbeat says so only at
        # the next beat, up to 5 s later).
        key = Worker.redis_worker_namespace_prefix + self.worker_names[name]
        with contextlib.closing(self.redis()) as client:
            return Worker.find_by_key(key, client) is not None

    def _backend_healthy(self) -> bool:
        return requests.get(f"{self.backend_url}/health", timeout=2).status_code == 200

    def stop(self) -> None:
        """Stop what this stack started: Label Studio first, Redis last. Safe to call twice."""
        try:
            if self._owns_label_studio:
                self.label_studio.stop()
                self._owns_label_studio = False
        finally:
            if self._group is not None:
                group, self._group = self._group, None
                group.__exit__(None, None, None)
            self._processes.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- while running -------------------------------------------------------------------------------

    def check_running(self) -> None:
        """Raise ProcessFailed when one of the stack's processes has exited."""
        for name, process in self._processes.items():
            code = process.returncode
            if code is not None:
                raise ProcessFailed(name, f"exited with code {code}", process.tail())
        if self._owns_label_studio and not self.label_studio.running:
            raise ProcessFailed("studio", "Label Studio exited", [])

    def wait(self, poll_s: float = 0.5) -> None:
        """Block until one of the processes exits (then raise ProcessFailed) or Ctrl-C."""
        while True:
            self.check_running()
            time.sleep(poll_s)
