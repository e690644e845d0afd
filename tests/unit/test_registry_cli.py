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
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    if args[0] == "import":  # the family is checked by test_import_says_the_family_or_refuses
        assert lines[0].pop("family") == "region_llm" and lines[0].pop("about")
    return lines


def test_import_says_the_family_or_refuses(tmp_path):
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    done = subprocess.run(
        [str(ROI_MODEL), "registry", "--model-dir", str(tmp_path / "models"), "import", str(qwen)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert imported["family"] == "qwen2_5_vl" and "Qwen2.5-VL" in imported["about"]
    assert ModelRegistry(tmp_path / "models").card(imported["version"])["family"] == "qwen2_5_vl"

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    done = subprocess.run(
        [str(ROI_MODEL), "registry", "--model-dir", str(tmp_path / "models"), "import", str(bert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert (
        "model_type 'bert'" in done.stderr
        and "supported: florence2, qwen2_5_vl, qwen3_vl, region_llm" in done.stderr
    )


def a_model(path: Path, card: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "region_llm"}))
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
