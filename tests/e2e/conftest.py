"""Fixtures for the end-to-end tests: a real Label Studio 1.23.2, its API client, and the browser driver.

* `label_studio`: one LabelStudio for the whole session, on a copy of a migrated data dir. The venv
  and the template data dir are made once in .cache/label-studio (about a minute, then 30-50 s of
  migrations); later sessions start in about 5 s. Its local-files root is `label_studio.files_root`;
  its log is `label_studio.log_path`.
* `ls_client`: a LabelStudioClient for it, with the legacy token.
* `run_draw_box(...)`: draws a box with the smart rectangle tool in headless Chromium
  (tests/e2e/browser/draw_box.js) and returns the JSON line it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from backend.ls_client import LabelStudioClient
from devstack.label_studio import LabelStudio, copy_data_template, ensure_venv

REPO_ROOT = Path(__file__).resolve().parents[2]
BROWSER_DIR = Path(__file__).resolve().parent / "browser"


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


class DrawBoxFailed(AssertionError):
    """draw_box.js did not finish its steps; the message has its report and stderr."""


def run_draw_box(
    label_studio: LabelStudio,
    project: int,
    task: int,
    box: Sequence[float],
    screenshot: Path,
    *,
    label: str | None = None,
    submit: bool = False,
    timeout_s: float = 180.0,
) -> dict:
    """Open `task` in the labeling UI, draw `box` (x1, y1, x2, y2 in 0..1 of the canvas) with Auto-Annotation on.

    Returns draw_box.js's report: "status" and "body" of LS's /interactive-annotating reply, "texts" shown
    in the new region's per-region text field, "label", "regions_before"/"regions_after", and with
    `submit` "submit_status" and "annotation_id". Raises DrawBoxFailed when a step failed.
    """
    ensure_node_modules()
    argv = [
        "node",
        str(BROWSER_DIR / "draw_box.js"),
        "--url", label_studio.url,
        "--email", label_studio.email,
        "--project", str(project),
        "--task", str(task),
        "--box", ",".join(f"{value:.4f}" for value in box),
        "--screenshot", str(screenshot),
        "--timeout-ms", str(int(timeout_s * 1000 / 2)),
    ]  # fmt: skip
    if label is not None:
        argv += ["--label", label]
    if submit:
        argv.append("--submit")
    # The password goes through the environment, not the command line.
    env = {**os.environ, "LS_PASSWORD": label_studio.password}
    completed = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
    lines = completed.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as error:
        raise DrawBoxFailed(
            f"draw_box.js exited with {completed.returncode} without a report:\n{completed.stdout}\n{completed.stderr}"
        ) from error
    if completed.returncode != 0 or not report.get("ok"):
        raise DrawBoxFailed(f"draw_box.js failed: {json.dumps(report)}\nstderr:\n{completed.stderr[-3000:]}")
    return report


@pytest.fixture
def draw_box(label_studio: LabelStudio):
    """`run_draw_box` bound to the session's Label Studio: draw_box(project, task, box, screenshot, ...)."""

    def draw(project: int, task: int, box: Sequence[float], screenshot: Path, **options) -> dict:
        return run_draw_box(label_studio, project, task, box, screenshot, **options)

    return draw
