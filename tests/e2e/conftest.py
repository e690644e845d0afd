"""Fixtures for the end-to-end tests: a real Label Studio 1.23.2, its API client, and the browser driver.

* `label_studio`: one LabelStudio for the whole session, on a copy of a migrated data dir. The venv
  and the template data dir are made once in .cache/label-studio (about a minute, then 30-50 s of
  migrations); later sessions start in about 5 s. Its local-files root is `label_studio.files_root`;
  its log is `label_studio.log_path`.
* `ls_client`: a LabelStudioClient for it, with the legacy token.
* `run_annotate(...)`: plays an annotator's steps on a task in headless Chromium (tests/e2e/browser/
  annotate.js: draw boxes with the smart tool, type into a box's field and press Enter) and returns the
  JSON line it prints; `run_draw_box(...)` draws one box.
* `run_open_task(...)`: opens a task in headless Chromium (tests/e2e/browser/open_task.js) and returns
  what the labeling panel shows.
* `served_model`: the model the stack serves: models/demo, or a tiny random stand-in while models/demo
  does not exist (tests of the model's answers then fail, saying so).
* `stack`: Redis, a worker, the backend (devstack.stack.Stack) around the session's Label Studio; its
  processes' output is in `stack_log`.
* `--save-screenshots`: the browser tests also copy their screenshots to labeling_configs/screenshots/.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from backend.ls_client import LabelStudioClient
from devstack.label_studio import LabelStudio, copy_data_template, ensure_venv
from devstack.provision import import_model
from devstack.stack import LogLines, Stack
from tests.waiting import wait_until  # noqa: F401 (the e2e tests import it from here)

REPO_ROOT = Path(__file__).resolve().parents[2]
BROWSER_DIR = Path(__file__).resolve().parent / "browser"
DEMO_MODEL = REPO_ROOT / "models" / "demo"
SCREENSHOTS = REPO_ROOT / "labeling_configs" / "screenshots"
T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--save-screenshots",
        action="store_true",
        help="also copy the browser tests' screenshots to labeling_configs/screenshots/ (for the README)",
    )


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    venv = ensure_venv(REPO_ROOT / ".cache" / "label-studio")
    root = tmp_path_factory.mktemp("label-studio")
    # A copy of a migrated data dir starts in seconds; the migrations run once per venv.
    copy_data_template(venv, root / "data")
    with LabelStudio(root / "data", root / "files", venv=venv) as server:
        yield server


@pytest.fixture(scope="session")
def ls_client(label_studio: LabelStudio) -> LabelStudioClient:
    return LabelStudioClient(label_studio.url, label_studio.token)


def ensure_node_modules() -> None:
    """`npm ci` from the committed lock file when node_modules is missing (no browser is downloaded)."""
    if (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").exists():
        return
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BROWSER_DIR, check=True, timeout=300
    )


class BrowserStepFailed(AssertionError):
    """A browser script did not finish its steps; the message has its report and stderr."""


def run_annotate(
    label_studio: LabelStudio,
    project: int,
    task: int,
    steps: Sequence[dict],
    screenshot: Path,
    *,
    label: str | None = None,
    submit: bool = False,
    timeout_s: float = 240.0,
) -> dict:
    """Open `task` in the labeling UI with Auto-Annotation and Auto-Accept on and play `steps` as an
    annotator does (tests/e2e/browser/annotate.js: draw a box, type into a box's field and press Enter).

    Returns annotate.js's report: per step the interactive call it made ("status", "body": LS's reply,
    "ms"), the "regions" with their per-region texts, the task-level "task_texts", the "page_text", and
    with `submit` "submit_status" and "annotation_id". Raises BrowserStepFailed when a step failed.
    """
    ensure_node_modules()
    argv = [
        "node",
        str(BROWSER_DIR / "annotate.js"),
        "--url", label_studio.url,
        "--email", label_studio.email,
        "--project", str(project),
        "--task", str(task),
        "--steps", json.dumps(list(steps)),
        "--screenshot", str(screenshot),
        "--timeout-ms", str(int(timeout_s * 1000 / 2)),
    ]  # fmt: skip
    if label is not None:
        argv += ["--label", label]
    if submit:
        argv.append("--submit")
    return _run_browser_script(label_studio, argv, timeout_s)


def run_start_training(
    label_studio: LabelStudio, project: int, backend_url: str, screenshot: Path, *, timeout_s: float = 180.0
) -> dict:
    """Click Start Training on the project's model card (tests/e2e/browser/start_training.js) and open the
    backend's training status page; returns the script's report ("dialog", "status_page")."""
    ensure_node_modules()
    argv = [
        "node",
        str(BROWSER_DIR / "start_training.js"),
        "--url", label_studio.url,
        "--email", label_studio.email,
        "--project", str(project),
        "--task", "0",
        "--status-url", f"{backend_url}/training/{project}",
        "--screenshot", str(screenshot),
        "--timeout-ms", str(int(timeout_s * 1000 / 2)),
    ]  # fmt: skip
    return _run_browser_script(label_studio, argv, timeout_s)


def run_draw_box(
    label_studio: LabelStudio, project: int, task: int, box: Sequence[float], screenshot: Path, **options
) -> dict:
    """One box drawn (x1, y1, x2, y2 in 0..1 of the canvas): run_annotate's report plus, for that box,
    "status" and "body" of its interactive call, "texts" of the new region, "regions_before"/"regions_after"."""
    report = run_annotate(
        label_studio, project, task, [{"draw": [round(v, 4) for v in box]}], screenshot, **options
    )
    call = report["steps"][0]["call"] or {}
    regions = report["regions"]
    newest = max(regions, key=lambda region: region["index"]) if regions else {"texts": []}
    return {
        **report,
        **call,
        "texts": newest["texts"],
        "regions_after": len(regions),
        "regions_before": report["regions_before"],
    }


@pytest.fixture
def draw_box(label_studio: LabelStudio):
    """`run_draw_box` bound to the session's Label Studio: draw_box(project, task, box, screenshot, ...)."""

    def draw(project: int, task: int, box: Sequence[float], screenshot: Path, **options) -> dict:
        return run_draw_box(label_studio, project, task, box, screenshot, **options)

    return draw


def run_open_task(
    label_studio: LabelStudio, project: int, task: int, screenshot: Path, *, timeout_s: float = 180.0
) -> dict:
    """Open `task` in the labeling UI and select its first region.

    Returns open_task.js's report: "regions" (how many the outliner lists), "texts" (the non-empty text
    fields) and "page_text" (the page's visible text). Raises BrowserStepFailed when a step failed.
    """
    ensure_node_modules()
    argv = [
        "node",
        str(BROWSER_DIR / "open_task.js"),
        "--url", label_studio.url,
        "--email", label_studio.email,
        "--project", str(project),
        "--task", str(task),
        "--screenshot", str(screenshot),
        "--timeout-ms", str(int(timeout_s * 1000 / 2)),
    ]  # fmt: skip
    return _run_browser_script(label_studio, argv, timeout_s)


def _run_browser_script(label_studio: LabelStudio, argv: list[str], timeout_s: float) -> dict:
    """Run a browser script (`node SCRIPT ...`) and return its last-line JSON report."""
    script = Path(argv[1]).name
    # The password goes through the environment, not the command line.
    env = {**os.environ, "LS_PASSWORD": label_studio.password}
    completed = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
    lines = completed.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as error:
        raise BrowserStepFailed(
            f"{script} exited with {completed.returncode} without a report:\n{completed.stdout}\n{completed.stderr}"
        ) from error
    if completed.returncode != 0 or not report.get("ok"):
        raise BrowserStepFailed(f"{script} failed: {json.dumps(report)}\nstderr:\n{completed.stderr[-3000:]}")
    return report


@pytest.fixture
def save_screenshot(request: pytest.FixtureRequest):
    """save_screenshot(shot, name): with --save-screenshots, copy `shot` to labeling_configs/screenshots/<name>.png."""

    def save(shot: Path, name: str) -> None:
        if request.config.getoption("--save-screenshots"):
            SCREENSHOTS.mkdir(exist_ok=True)
            (SCREENSHOTS / f"{name}.png").write_bytes(shot.read_bytes())

    return save


@dataclass(frozen=True)
class ServedModel:
    source: Path  # the model directory imported into `registry`
    registry: Path  # the stack's MODEL_DIR
    version: str  # its version in the registry: the model_version of every answer
    is_demo: bool  # False: models/demo does not exist, and a tiny random model stands in


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    root = tmp_path_factory.mktemp("served-model")
    if (DEMO_MODEL / "card.json").is_file():  # written last by `make demo-model`: the model is complete
        source, is_demo = DEMO_MODEL, True
    else:
        from tests.integration.worker_harness import save_tiny_model  # torch: only when needed

        source, is_demo = save_tiny_model(root / "tiny-model"), False
    registry = root / "registry"
    return ServedModel(source, registry, import_model(registry, source), is_demo)


def require_demo_model(served: ServedModel) -> None:
    """Fail (never skip) a check of the model's answers when the stand-in model gave them."""
    if not served.is_demo:
        pytest.fail(
            f"{DEMO_MODEL.relative_to(REPO_ROOT)} does not exist, so a tiny random model answered and its "
            "answers cannot be the true ones: train the demo model with `make demo-model`",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def stack_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack") / "stack.log"


@pytest.fixture(scope="session")
def stack(label_studio: LabelStudio, served_model: ServedModel, stack_log: Path) -> Iterator[Stack]:
    with open(stack_log, "a", buffering=1) as log_file:
        lines = LogLines(lambda line: log_file.write(line + "\n"))
        # The stand-in model never stops before the token limit: a short limit keeps its answers quick.
        env = {} if served_model.is_demo else {"ROI_MAX_NEW_TOKENS": "8"}
        with Stack(
            stack_log.parent, served_model.registry, label_studio, lines=lines, extra_env=env
        ) as running:
            yield running
