"""ProcessGroup / ManagedProcess with real, short-lived Python subprocesses."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from devstack.processes import ManagedProcess, ProcessFailed, ProcessGroup
from tests.waiting import wait_until

PY = sys.executable


def python(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


class Lines:
    """A thread-safe sink that remembers every line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)


def is_gone(pid: int) -> bool:
    """True when the process no longer exists or is a zombie (a container's init may not reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_output_lines_are_prefixed_with_the_name_and_stderr_is_included() -> None:
    sink = Lines()
    with ProcessGroup(sink=sink) as group:
        process = group.start(
            "worker", python("import sys; print('hello'); print('to stderr', file=sys.stderr); print('bye')")
        )
        assert process.wait(timeout_s=30) == 0
    assert sink.lines == ["worker   | hello", "worker   | to stderr", "worker   | bye"]


def test_env_and_cwd_reach_the_process(tmp_path: Path) -> None:
    sink = Lines()
    with ProcessGroup(sink=sink) as group:
        process = group.start(
            "envtest",
            python("import os; print(os.environ['ROI_TEST_VALUE'], os.getcwd())"),
            env={"ROI_TEST_VALUE": "forty-two"},
            cwd=tmp_path,
        )
        process.wait(timeout_s=30)
    assert sink.lines == [f"envtest  | forty-two {tmp_path}"]


def test_wait_ready_returns_once_the_check_passes(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    with ProcessGroup(sink=Lines()) as group:
        process = group.start(
            "server",
            python(f"""
                import pathlib, time
                time.sleep(0.3)
                pathlib.Path({str(flag)!r}).write_text("up")
                time.sleep(60)
            """),
        )
        process.wait_ready(flag.exists, timeout_s=30)
        assert process.returncode is None
    assert process.returncode is not None


def test_a_check_that_raises_counts_as_not_ready_yet(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    with ProcessGroup(sink=Lines()) as group:
        process = group.start(
            "server", python(f"import pathlib, time; pathlib.Path({str(flag)!r}).touch(); time.sleep(60)")
        )
        process.wait_ready(lambda: flag.read_text() == "", timeout_s=30)  # FileNotFoundError until it exists


def test_death_before_ready_is_reported_with_the_last_lines() -> None:
    with ProcessGroup(sink=Lines()) as group:
        process = group.start(
            "broken",
            python(
                "import sys; print('loading config'); print('boom: no such model', file=sys.stderr); sys.exit(3)"
            ),
        )
        with pytest.raises(ProcessFailed) as failure:
            process.wait_ready(lambda: False, timeout_s=30)
    message = str(failure.value)
    assert "broken: exited with code 3 before it was ready" in message
    assert "boom: no such model" in message
    assert failure.value.tail == ["loading config", "boom: no such model"]


def test_a_check_can_give_up_at_once_with_process_failed() -> None:
    def check() -> bool:
        raise ProcessFailed("server", "port 80 is in use", ["* Port 80 is in use."])

    with ProcessGroup(sink=Lines()) as group:
        process = group.start("server", python("import time; time.sleep(60)"))
        started = time.monotonic()
        with pytest.raises(ProcessFailed, match="server: port 80 is in use"):
            process.wait_ready(check, timeout_s=30)
        assert time.monotonic() - started < 10


def test_not_ready_before_the_deadline_is_reported() -> None:
    with ProcessGroup(sink=Lines()) as group:
        process = group.start(
            "slow", python("print('still starting', flush=True); import time; time.sleep(60)")
        )
        wait_until(lambda: process.tail() == ["still starting"])
        with pytest.raises(ProcessFailed, match=r"slow: not ready after 0.2 s(.|\n)*still starting"):
            process.wait_ready(lambda: False, timeout_s=0.2)


def test_processes_stop_in_reverse_start_order(tmp_path: Path) -> None:
    record = tmp_path / "stopped"
    child = """
        import pathlib, signal, sys, time
        def on_term(signum, frame):
            with open({record!r}, "a") as out:
                out.write("{name}\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep(60)
    """
    with ProcessGroup(sink=Lines()) as group:
        for name in ("redis", "worker", "backend"):
            process = group.start(name, python(child.format(record=str(record), name=name)))
            process.wait_ready(lambda p=process: p.tail() == ["ready"], timeout_s=30)
    assert record.read_text().split() == ["backend", "worker", "redis"]


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    stubborn = ManagedProcess(
        "stubborn",
        python("""
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ignoring SIGTERM", flush=True)
            time.sleep(60)
        """),
        sink=Lines(),
    ).start()
    stubborn.wait_ready(lambda: stubborn.tail() == ["ignoring SIGTERM"], timeout_s=30)
    started = time.monotonic()
    assert stubborn.stop(grace_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_children_of_a_process_are_stopped_too() -> None:
    sink = Lines()
    with ProcessGroup(sink=sink, grace_s=2) as group:
        parent = group.start(
            "parent",
            python(f"""
                import subprocess, time
                child = subprocess.Popen([{PY!r}, "-c", "import time; time.sleep(60)"])
                print(child.pid, flush=True)
                time.sleep(60)
            """),
        )
        parent.wait_ready(lambda: len(parent.tail()) == 1, timeout_s=30)
        grandchild = int(parent.tail()[0])
        assert not is_gone(grandchild)
    wait_until(lambda: is_gone(grandchild))
    assert is_gone(parent.pid)


def test_an_exception_in_the_block_stops_everything() -> None:
    with pytest.raises(KeyboardInterrupt), ProcessGroup(sink=Lines()) as group:
        sleeper = group.start("sleeper", python("import time; time.sleep(60)"))
        raise KeyboardInterrupt
    assert sleeper.returncode is not None


def test_sigterm_to_the_supervisor_stops_its_processes(tmp_path: Path) -> None:
    supervisor_code = f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from devstack.processes import ProcessGroup
        with ProcessGroup() as group:
            child = group.start("sleeper", [{PY!r}, "-c", "import time; time.sleep(60)"])
            print("child", child.pid, flush=True)
            time.sleep(60)
    """
    supervisor = subprocess.Popen(python(supervisor_code), stdout=subprocess.PIPE, text=True)
    try:
        first_line = supervisor.stdout.readline().split()
        assert first_line[0] == "child", first_line
        child_pid = int(first_line[1])
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 128 + signal.SIGTERM
        wait_until(lambda: is_gone(child_pid))
    finally:
        supervisor.kill()
        supervisor.wait()
        supervisor.stdout.close()


def test_bad_input_is_refused_clearly() -> None:
    with ProcessGroup(sink=Lines()) as group:
        group.start("one", python("pass"))
        with pytest.raises(ValueError, match="'one' is already in this group"):
            group.start("one", python("pass"))
        with pytest.raises(ProcessFailed, match="could not start '/no/such/program'"):
            group.start("missing", ["/no/such/program"])
        with pytest.raises(ValueError, match="argv is empty"):
            group.start("empty", [])
        assert group["one"].name == "one"


def test_stop_twice_and_stop_of_an_exited_process_are_harmless() -> None:
    process = ManagedProcess("quick", python("print('done')"), sink=Lines()).start()
    assert process.wait(timeout_s=30) == 0
    assert process.stop() == 0
    assert process.stop() == 0
