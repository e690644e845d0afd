"""Per-project lineages of adapters in worker.registry, and `roi-model registry --project`, on a real directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_registry import model_dir
from worker.registry import ModelRegistry, RegistryError, Serving

ROI_MODEL = Path(sys.executable).with_name("roi-model")


def adapter_dir(path: Path, marker: str = "lora") -> Path:
    """A stand-in for a peft adapter directory."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "marker": marker}))
    (path / "adapter_model.safetensors").write_bytes(marker.encode() * 10)
    return path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "models")
    registry.import_model(model_dir(tmp_path / "base"), version="base-1")
    return registry


def publish_adapter(registry: ModelRegistry, project: int, tmp_path: Path, marker: str, base="base-1") -> str:
    source = adapter_dir(tmp_path / f"adapter-{project}-{marker}", marker)
    return registry.lineage(project).publish(source, extra={"base": base, "project": project})


def test_a_project_that_never_trained_is_served_the_base(registry):
    assert registry.serving(7) == Serving("base-1", 7, None)
    assert registry.serving(7).version == "base-1"
    assert registry.serving(None).version == "base-1"
    assert registry.projects() == [] and registry.served_versions() == {}


def test_each_project_has_its_own_lineage_and_version_names_base_and_adapter(registry, tmp_path):
    a1 = publish_adapter(registry, 3, tmp_path, "a1")
    b1 = publish_adapter(registry, 12, tmp_path, "b1")
    a2 = publish_adapter(registry, 3, tmp_path, "a2")
    assert (a1, b1, a2) == ("v1", "v1", "v2")  # numbered per lineage
    registry.lineage(3).promote(a2)
    registry.lineage(12).promote(b1)

    assert registry.serving(3).version == "base-1+p3-v2"
    assert registry.serving(12).version == "base-1+p12-v1"
    assert registry.serving(5).version == "base-1"
    assert registry.projects() == [3, 12]
    assert registry.served_versions() == {"3": "base-1+p3-v2", "12": "base-1+p12-v1"}
    # the global lineage is untouched
    assert registry.current() == "base-1"
    assert [card["version"] for card in registry.versions()] == ["base-1"]
    assert [card["version"] for card in registry.lineage(3).versions()] == ["v1", "v2"]
    assert (registry.root / "projects" / "3" / "adapters" / "v2" / "adapter_model.safetensors").is_file()
    assert (registry.root / "projects" / "3" / "current").read_text() == "v2\n"


def test_rolling_back_a_projects_first_adapter_serves_the_base(registry, tmp_path):
    lineage = registry.lineage(3)
    lineage.promote(publish_adapter(registry, 3, tmp_path, "a1"))
    lineage.promote(publish_adapter(registry, 3, tmp_path, "a2"))
    assert lineage.rollback() == "v1"
    assert registry.serving(3).version == "base-1+p3-v1"
    assert lineage.rollback() is None
    assert registry.serving(3) == Serving("base-1", 3, None)
    assert [entry["version"] for entry in lineage.history()] == ["v1", "v2", "v1", None]
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        lineage.rollback()
    # the global lineage keeps its own rule: its first version has nothing before it
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()


def test_an_adapter_of_another_base_is_not_served_nor_promoted(registry, tmp_path):
    lineage = registry.lineage(3)
    lineage.promote(publish_adapter(registry, 3, tmp_path, "a1"))
    registry.publish(model_dir(tmp_path / "base2", "other"), version="base-2")
    registry.promote("base-2")  # an explicit new base: the project's adapter was trained on base-1
    assert registry.serving(3) == Serving("base-2", 3, None)
    stale = publish_adapter(registry, 3, tmp_path, "a2", base="base-1")
    with pytest.raises(RegistryError, match=r"trained on base 'base-1'.*base-2"):
        lineage.promote(stale)


def test_bad_project_ids_are_clear_errors(tmp_path):
    for bad in (-1, "3", True, 2.0):
        with pytest.raises(RegistryError, match="invalid project"):
            ModelRegistry(tmp_path, project=bad)


def registry_command(root: Path, *args: str) -> list[dict]:
    done = subprocess.run(
        [str(ROI_MODEL), "registry", "--model-dir", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_cli_list_promote_rollback_report_take_a_project(registry, tmp_path):
    root = registry.root
    publish_adapter(registry, 4, tmp_path, "a1")
    publish_adapter(registry, 4, tmp_path, "a2")
    registry_command(root, "promote", "v1", "--project", "4")
    assert registry_command(root, "promote", "v2", "--project", "4") == [
        {"current": "v2", "model_version": "base-1+p4-v2"}
    ]
    listed = registry_command(root, "list", "--project", "4")
    assert [(line["version"], line["served"], line["model_version"]) for line in listed] == [
        ("v1", False, "base-1+p4-v1"),
        ("v2", True, "base-1+p4-v2"),
    ]
    assert [line["version"] for line in registry_command(root, "list")] == ["base-1"]  # global: as before
    assert registry_command(root, "rollback", "--project", "4") == [
        {"current": "v1", "model_version": "base-1+p4-v1"}
    ]
    assert registry_command(root, "rollback", "--project", "4") == [
        {"current": None, "model_version": "base-1"}
    ]
    registry.record_training_run(
        {
            "project": 4,
            "lineage": "project",
            "at": "2026-12-01T00:00:00+00:00",
            "parent": "base-1",
            "promoted": None,
        }
    )
    out = tmp_path / "report.png"
    assert registry_command(root, "report", "--project", "4", "--out", str(out)) == [{"report": str(out)}]
    assert out.stat().st_size > 0
    done = subprocess.run(
        [str(ROI_MODEL), "registry", "--model-dir", str(root), "promote", "v9", "--project", "4"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0 and "'v9' not found" in done.stderr
