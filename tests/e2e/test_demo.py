"""`make demo` (python -m devstack.demo) end to end: start, pre-label, Ctrl-C, start again on the same state."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.ls_client import LabelStudioClient
from devstack.demo import IMAGES, PROJECT_TITLE
from devstack.processes import ManagedProcess
from devstack.provision import has_prediction
from tests.e2e.conftest import ServedModel

REPO_ROOT = Path(__file__).resolve().parents[2]
USUAL_PORTS = (8080, 9090)
_BANNER = {
    "seconds": re.compile(r"^The demo is ready \((\d+) s"),
    "label_studio": re.compile(r"^  Label Studio +(http://127\.0\.0\.1:\d+)/projects/(\d+)/data$"),
    "login": re.compile(r"^  Log in as +(\S+) / (\S+)$"),
    "backend": re.compile(r"^  ML backend +(http://127\.0\.0\.1:\d+) "),
}


@dataclass(frozen=True)
class Ready:
    label_studio: str
    project: int
    email: str
    password: str
    backend: str
    banner: str


class DemoRun:
    """`python -m devstack.demo ...` as a devstack ManagedProcess; its whole output is kept in `log_path`."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.process = ManagedProcess(
            "demo",
            [sys.executable, "-m", "devstack.demo", *argv],
            cwd=REPO_ROOT,
            sink=lambda line: None,
            record=log_path,
        ).start()

    @property
    def lines(self) -> list[str]:
        return self.process.recorded().splitlines()

    def wait_ready(self, timeout_s: float) -> Ready:
        """The parsed banner, once the demo printed it; fails the test if the demo exits or times out."""
        self.process.wait_ready(lambda: "Ctrl-C stops everything." in self.lines, timeout_s, interval_s=1)
        lines = self.lines
        start = max(i for i, line in enumerate(lines) if _BANNER["seconds"].match(line))
        banner = lines[start:]
        found = {}
        for line in banner:
            for key, pattern in _BANNER.items():
                if match := pattern.match(line):
                    found[key] = match.groups()
        return Ready(
            label_studio=found["label_studio"][0],
            project=int(found["label_studio"][1]),
            email=found["login"][0],
            password=found["login"][1],
            backend=found["backend"][0],
            banner="\n".join(banner),
        )

    def interrupt(self, timeout_s: float = 90) -> int:
        """Ctrl-C, as in a terminal; returns the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout_s)

    def tail(self, count: int = 40) -> str:
        return "\n".join(self.lines[-count:])

    def __enter__(self) -> DemoRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.running:  # a failed test: stop it the way a user would
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def usual_ports_taken() -> Iterator[None]:
    """8080 and 9090 are taken while the test runs: by this fixture, or by whoever already listens there."""
    holders = []
    for port in USUAL_PORTS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            holders.append(sock)
        except OSError:
            sock.close()
    yield
    for sock in holders:
        sock.close()


def listening(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


def demo_state(client: LabelStudioClient, ready: Ready, version: str) -> dict:
    """What the demo made, as Label Studio reports it."""
    projects = [project.id for project in client.sdk.projects.list() if project.title == PROJECT_TITLE]
    tasks = client.get_tasks(ready.project)
    return {
        "projects": projects,
        "tasks": len(tasks),
        "pre-labelled": sum(has_prediction(task, version) for task in tasks),
        "predictions of the version": sum(
            prediction["model_version"] == version for task in tasks for prediction in task["predictions"]
        ),
        "captions": [
            item["value"]["text"][0]
            for task in tasks
            for prediction in task["predictions"]
            if prediction["model_version"] == version
            for item in prediction["result"]
            if item["type"] == "textarea"
        ],
    }


def test_the_demo_starts_on_other_ports_prelabels_stops_and_starts_again(
    tmp_path: Path, served_model: ServedModel, usual_ports_taken: None
) -> None:
    state = tmp_path / "state"
    argv = ["--model", str(served_model.source), "--state-dir", str(state)]

    with DemoRun(argv, tmp_path / "first.log") as first:
        ready = first.wait_ready(timeout_s=600)
        token = json.loads((state / "label-studio" / "credentials.json").read_text())["token"]
        client = LabelStudioClient(ready.label_studio, token)
        version = (state / "models" / "current").read_text().strip()

        assert not ready.label_studio.endswith(":8080") and not ready.backend.endswith(":9090")
        assert "8080/9090 taken" in ready.banner
        made = demo_state(client, ready, version)
        assert made["projects"] == [ready.project]
        assert (made["tasks"], made["pre-labelled"], made["predictions of the version"]) == (IMAGES,) * 3
        imported = json.loads((state / "files" / "world" / "tasks.json").read_text())
        assert len(made["captions"]) == sum(len(task["predictions"][0]["result"]) for task in imported)
        assert first.interrupt() == 0
    assert first.lines[-1] == "Stopped: every process the demo started has exited."
    assert not listening(ready.label_studio) and not listening(ready.backend)

    with DemoRun(argv, tmp_path / "second.log") as second:
        again = second.wait_ready(timeout_s=300)
        client = LabelStudioClient(again.label_studio, token)
        assert (again.email, again.password) == (ready.email, ready.password)
        # The same project, tasks and predictions: nothing imported or predicted twice.
        assert demo_state(client, again, version) == made
        assert [path.name for path in (state / "models" / "versions").iterdir()] == [version]
        assert second.interrupt() == 0
    assert not listening(again.label_studio) and not listening(again.backend)


def test_a_missing_model_is_reported_in_one_sentence(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "devstack.demo",
            "--model",
            str(tmp_path / "nothing"),
            "--state-dir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.strip().splitlines() == [
        f"make demo: there is no model directory at {tmp_path / 'nothing'}: train the demo model with "
        "`make demo-model`, or pass --model DIR."
    ]
