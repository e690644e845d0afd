"""Run a few long-lived subprocesses together, for `make demo` and the end-to-end tests.

Each process runs in its own process group, so stopping it also stops whatever it
spawned (gunicorn workers, a dev server's children). Its stdout and stderr are read
line by line and handed to a sink with the process name as a prefix
(``worker   | loading model``). A `ProcessGroup` stops its processes in reverse start
order when the ``with`` block ends, also on Ctrl-C or an exception.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

Sink = Callable[[str], None]

TAIL_LINES = 40


class ProcessFailed(RuntimeError):
    """A managed process died or did not become ready; the message ends with its last output lines."""

    def __init__(self, name: str, reason: str, tail: Sequence[str]):
        self.name = name
        self.tail = list(tail)
        shown = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        super().__init__(f"{name}: {reason}; its last output lines:\n{shown}")


def _print_sink(line: str) -> None:
    print(line, flush=True)


class ManagedProcess:
    """One subprocess whose output is streamed to a sink and which can be stopped with its children."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        sink: Sink = _print_sink,
        prefix: str | None = None,
        record: os.PathLike | str | None = None,
    ):
        """`record`: a file that also receives every output line, whole (the tail keeps the last ones only)."""
        if not argv:
            raise ValueError(f"{name}: argv is empty")
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self.cwd = Path(cwd) if cwd is not None else None
        self._extra_env = dict(env or {})
        self._sink = sink
        self._prefix = f"{name:<8} | " if prefix is None else prefix
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._popen: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.record = Path(record) if record is not None else None

    def start(self) -> ManagedProcess:
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        # The child inherits our environment plus the caller's additions; unbuffered so that
        # Python children's lines arrive as they are printed, not when a pipe buffer fills.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self._extra_env}
        log.info("starting %s: %s", self.name, " ".join(self.argv))
        try:
            self._popen = subprocess.Popen(
                self.argv,
                env=env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                # Own process group: we signal the whole group, and the terminal's Ctrl-C reaches
                # only us, so that we stop the processes in our order.
                start_new_session=True,
            )
        except OSError as error:
            raise ProcessFailed(self.name, f"could not start {self.argv[0]!r}: {error}", []) from error
        self._reader = threading.Thread(target=self._pump, name=f"output-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _pump(self) -> None:
        assert self._popen is not None and self._popen.stdout is not None
        recorded = open(self.record, "a") if self.record is not None else None  # noqa: SIM115 (closed below)
        try:
            for raw in self._popen.stdout:
                self._take(raw.rstrip("\r\n"), recorded)
        finally:
            if recorded is not None:
                recorded.close()

    def _take(self, line: str, recorded) -> None:
        if recorded is not None:
            recorded.write(line + "\n")
            recorded.flush()
        self._tail.append(line)
        try:
            self._sink(self._prefix + line)
        except Exception:  # a broken sink must not stop us from draining the pipe
            log.exception("output sink of %s failed", self.name)

    @property
    def pid(self) -> int:
        return self._require_started().pid

    @property
    def returncode(self) -> int | None:
        """None while the process runs."""
        return self._require_started().poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def tail(self) -> list[str]:
        """The last output lines (at most TAIL_LINES)."""
        return list(self._tail)

    def recorded(self) -> str:
        """Everything the process printed so far (needs `record`)."""
        if self.record is None:
            raise RuntimeError(f"{self.name} records no output: start it with record=PATH")
        return self.record.read_text(errors="replace") if self.record.exists() else ""

    def send_signal(self, signum: int) -> None:
        """A signal to the process itself (not its group), as a terminal's Ctrl-C reaches a program."""
        self._require_started().send_signal(signum)

    def kill(self) -> int:
        """SIGKILL to the process group, as a crash would; returns the exit code."""
        popen = self._require_started()
        self._signal_group(signal.SIGKILL)
        code = popen.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        return code

    def _require_started(self) -> subprocess.Popen[str]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._popen

    def wait_ready(self, check: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> None:
        """Poll `check` until it returns true; raise ProcessFailed if the process exits or the deadline passes.

        An exception raised by `check` counts as "not ready yet" (a server that does not listen yet
        refuses connections), except ProcessFailed: `check` raises that to give up at once.
        """
        popen = self._require_started()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():
                    return
            except ProcessFailed:
                raise
            except Exception as error:
                log.debug("%s not ready yet: %s", self.name, error)
            if time.monotonic() >= deadline:
                raise ProcessFailed(self.name, f"not ready after {timeout_s:g} s", self._final_tail())
            try:
                # Waiting on the process (not sleeping) notices its death at once.
                code = popen.wait(timeout=interval_s)
            except subprocess.TimeoutExpired:
                continue
            raise ProcessFailed(self.name, f"exited with code {code} before it was ready", self._final_tail())

    def wait(self, timeout_s: float | None = None) -> int:
        """Wait for the process to exit by itself and its output to be read; returns the exit code.

        Raises subprocess.TimeoutExpired when it is still running after `timeout_s`.
        """
        code = self._require_started().wait(timeout=timeout_s)
        if self._reader is not None:
            self._reader.join(timeout=2)
        return code

    def _final_tail(self) -> list[str]:
        # Once the process has exited, let the reader drain the pipe so that the last lines are included.
        if self._popen is not None and self._popen.poll() is not None and self._reader is not None:
            self._reader.join(timeout=2)
        return self.tail()

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; returns the exit code."""
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            log.info("stopping %s (pid %d)", self.name, popen.pid)
            self._signal_group(signal.SIGTERM)
            try:
                popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, grace_s)
        # Also when the leader is gone: children it left in the group must not outlive us.
        self._signal_group(signal.SIGKILL)
        code = popen.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        return code

    def _signal_group(self, signum: int) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError):  # the group is already empty
            os.killpg(self._popen.pid, signum)


class ProcessGroup:
    """Named subprocesses that live as long as a ``with`` block; stopped in reverse start order.

    >>> with ProcessGroup() as group:
    ...     redis = group.start("redis", ["redis-server", "--port", "6390"])
    ...     redis.wait_ready(lambda: ping(6390), timeout_s=10)
    """

    def __init__(self, sink: Sink = _print_sink, grace_s: float = 10.0):
        self.grace_s = grace_s
        self._sink = sink
        self._sink_lock = threading.Lock()
        self._processes: list[ManagedProcess] = []
        self._sigterm_installed = False
        self._previous_sigterm: object = signal.SIG_DFL

    def _locked_sink(self, line: str) -> None:
        # One reader thread per process: keep their lines whole.
        with self._sink_lock:
            self._sink(line)

    def start(
        self,
        name: str,
        argv: Sequence[str | os.PathLike],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> ManagedProcess:
        if any(process.name == name for process in self._processes):
            raise ValueError(f"a process named {name!r} is already in this group")
        process = ManagedProcess(name, argv, env=env, cwd=cwd, sink=self._locked_sink).start()
        self._processes.append(process)
        return process

    def __getitem__(self, name: str) -> ManagedProcess:
        for process in self._processes:
            if process.name == name:
                return process
        raise KeyError(name)

    def stop_all(self) -> None:
        """Stop every process, the last started first. Safe to call twice."""
        while self._processes:
            process = self._processes.pop()
            try:
                process.stop(self.grace_s)
            except Exception:
                log.exception("could not stop %s", process.name)

    def __enter__(self) -> ProcessGroup:
        # A plain SIGTERM (kill, CI) would end Python without running __exit__ and leave our
        # children behind; turn it into SystemExit like Ctrl-C turns into KeyboardInterrupt.
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
            self._sigterm_installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop_all()
        finally:
            if self._sigterm_installed:
                # None: the previous handler was not set from Python; the default is the best guess.
                signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
                self._sigterm_installed = False


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
