"""`roi-model registry`, run as the installed console script on a real registry directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from worker.registry import ModelRegistry

ROI_MODEL = Path(sys.executable).with_name("roi-model")


def registry_command(root: Path, *args: str) -> list[dict]:
    done = subprocess.run(
        [str(ROI_MODEL), "registry", "--model-dir", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def a_model(path: Path, card: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt4roi"}))
    if card is not None:
        (path / "card.json").write_text(json.dumps(card))
    return path


def test_import_list_promote_and_rollback(tmp_path):
    root = tmp_path / "models"
    demo = a_model(tmp_path / "demo", card={"version": "demo-1", "metrics": {"exact_match": 1.0}})

    assert registry_command(root, "import", str(demo)) == [{"version": "demo-1", "current": "demo-1"}]
    assert registry_command(root, "import", str(a_model(tmp_path / "next"))) == [
        {"version": "v1", "current": "demo-1"}
    ]

    listed = registry_command(root, "list")
    assert [(card["version"], card["served"]) for card in listed] == [("demo-1", True), ("v1", False)]
    assert listed[0]["metrics"] == {"exact_match": 1.0}

    assert registry_command(root, "promote", "v1") == [{"current": "v1"}]
    assert ModelRegistry(root).current() == "v1"
    assert registry_command(root, "rollback") == [{"current": "demo-1"}]


def test_errors_name_the_problem_and_exit_non_zero(tmp_path):
    done = subprocess.run(
        [str(ROI_MODEL), "registry", "--model-dir", str(tmp_path), "promote", "v9"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "v9" in done.stderr
