"""worker.registry on a real filesystem, with real processes for crashes and concurrent readers."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.waiting import wait_until
from worker.registry import ModelRegistry, RegistryError, UnknownVersion

REPO_ROOT = Path(__file__).resolve().parents[2]


def model_dir(path: Path, marker: str = "weights", files: int = 2) -> Path:
    """A small stand-in for a Hugging Face model directory."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt4roi", "marker": marker}))
    for index in range(files):
        (path / f"model-{index}.safetensors").write_bytes(marker.encode() * 100)
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return model_dir(tmp_path / "trained")


def test_publish_copies_the_model_and_writes_its_card(registry, source):
    version = registry.publish(
        source,
        parent="base",
        metrics={"caption_cider": 0.71},
        dataset_digest="sha256:abc",
        extra={"epochs": 2},
    )

    assert version == "v1"
    copied = registry.path("v1")
    assert json.loads((copied / "config.json").read_text())["marker"] == "weights"
    assert (copied / "tokenizer" / "tokenizer.json").is_file()
    card = registry.card("v1")
    assert card["version"] == "v1"
    assert card["parent"] == "base"
    assert card["metrics"] == {"caption_cider": 0.71}
    assert card["dataset_digest"] == "sha256:abc"
    assert card["epochs"] == 2
    assert card["created_at"].endswith("+00:00")
    assert registry.current() is None


def test_versions_are_numbered_and_listed_oldest_first(registry, source):
    names = [registry.publish(source) for _ in range(3)]
    registry.publish(source, version="candidate-7")

    assert names == ["v1", "v2", "v3"]
    assert [card["version"] for card in registry.versions()] == ["v1", "v2", "v3", "candidate-7"]
    assert registry.publish(source) == "v4"


def test_a_card_in_the_source_is_kept_under_the_registry_fields(registry, source):
    (source / "card.json").write_text(
        json.dumps({"version": "old", "base_model": "vicuna-7b", "metrics": {"x": 1}})
    )

    registry.publish(source, metrics={"x": 2})

    card = registry.card("v1")
    assert (card["version"], card["base_model"], card["metrics"]) == ("v1", "vicuna-7b", {"x": 2})


def test_card_fields_not_given_to_publish_keep_the_source_card_values(registry, source):
    (source / "card.json").write_text(
        json.dumps({"parent": "base", "dataset_digest": "sha256:d", "metrics": {"exact_match": 0.9}})
    )

    registry.publish(source, extra={"note": "imported"})

    card = registry.card("v1")
    assert (card["parent"], card["dataset_digest"]) == ("base", "sha256:d")
    assert card["metrics"] == {"exact_match": 0.9}
    assert card["note"] == "imported"


def test_a_source_without_a_card_gets_empty_metrics_and_no_parent(registry, source):
    registry.publish(source)

    card = registry.card("v1")
    assert card["metrics"] == {}
    assert card.get("parent") is None


def test_publish_refuses_to_overwrite_and_bad_names(registry, source):
    registry.publish(source, version="v1")

    with pytest.raises(RegistryError, match="'v1' already exists"):
        registry.publish(source, version="v1")
    for bad in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(RegistryError, match="invalid model version name"):
            registry.publish(source, version=bad)
    with pytest.raises(RegistryError, match="not a directory"):
        registry.publish(source / "config.json")
    with pytest.raises(RegistryError, match=r"extra card fields \['version'\]"):
        registry.publish(source, extra={"version": "v9"})
    assert [card["version"] for card in registry.versions()] == ["v1"]
    assert [entry.name for entry in registry.versions_dir.iterdir()] == ["v1"]


def test_promote_and_rollback_step_back_through_the_promotions(registry, source):
    for _ in range(3):
        registry.promote(registry.publish(source))
    assert registry.current() == "v3"

    assert registry.rollback() == "v2"
    assert registry.current() == "v2"
    assert registry.rollback() == "v1"
    with pytest.raises(RegistryError, match=r"nothing to roll back to: .* only 'v1'"):
        registry.rollback()
    assert registry.current() == "v1"
    assert [(entry["action"], entry["version"], entry["previous"]) for entry in registry.history()] == [
        ("promote", "v1", None),
        ("promote", "v2", "v1"),
        ("promote", "v3", "v2"),
        ("rollback", "v2", "v3"),
        ("rollback", "v1", "v2"),
    ]
    assert all(entry["at"] for entry in registry.history())


def test_promoting_the_served_version_again_changes_nothing(registry, source):
    registry.promote(registry.publish(source))
    registry.promote(registry.publish(source))
    registry.promote("v2")

    assert registry.rollback() == "v1"


def test_rollback_without_promotions_is_a_clear_error(registry):
    with pytest.raises(RegistryError) as refusal:
        registry.rollback()
    assert str(refusal.value) == (
        f"nothing to roll back to: the promotion history of {registry.root} holds no promotion"
    )


def test_unknown_versions_are_clear_errors(registry, source):
    registry.publish(source)

    with pytest.raises(UnknownVersion, match=r"'v7' not found in .*versions \(known: v1\)"):
        registry.promote("v7")
    with pytest.raises(UnknownVersion):
        registry.card("v7")
    assert registry.current() is None


def test_import_model_promotes_only_the_first_model(registry, tmp_path):
    first = registry.import_model(model_dir(tmp_path / "a"))
    second = registry.import_model(model_dir(tmp_path / "b"))

    assert (first, second) == ("v1", "v2")
    assert registry.current() == "v1"


def test_a_failed_copy_leaves_no_version(registry, source):
    os.mkfifo(source / "model-9.safetensors")  # copying a named pipe fails

    with pytest.raises(Exception, match="named pipe"):
        registry.publish(source)

    assert registry.versions() == []
    assert list(registry.versions_dir.iterdir()) == []
    (source / "model-9.safetensors").unlink()
    assert registry.publish(source) == "v1"


CRASHING_PUBLISHER = textwrap.dedent(
    """
    import shutil, sys, time
    from pathlib import Path
    from worker.registry import ModelRegistry

    copy_file = shutil.copyfile
    copied = []

    def copy_then_hang(src, dst, **kwargs):
        copied.append(copy_file(src, dst, **kwargs))
        if len(copied) == 2:  # half the model is on disk: tell the test, then wait to be killed
            Path(sys.argv[3]).touch()
            time.sleep(600)
        return copied[-1]

    shutil.copyfile = copy_then_hang  # what shutil.copytree's copy2 calls for each file
    ModelRegistry(sys.argv[1]).publish(sys.argv[2])
    """
)


def test_a_publisher_killed_mid_copy_leaves_no_visible_version(registry, source, tmp_path):
    half_copied = tmp_path / "half-copied"
    publisher = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PUBLISHER, str(registry.root), str(source), str(half_copied)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        wait_until(half_copied.exists, message="the publisher copied half the model")
    finally:
        publisher.send_signal(signal.SIGKILL)
        publisher.wait(timeout=10)

    leftovers = list(registry.versions_dir.iterdir())
    assert [entry.name.startswith(".incoming-") for entry in leftovers] == [True]
    assert registry.versions() == []
    assert registry.publish(source) == "v1"
    assert len(list(registry.path("v1").glob("*.safetensors"))) == 2


READER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    current, ready, stop, report = (Path(arg) for arg in sys.argv[1:])
    seen, reads = {}, 0
    while not stop.exists():
        value = current.read_text()
        seen[value] = seen.get(value, 0) + 1
        reads += 1
        if reads == 1:
            ready.touch()
    report.write_text(json.dumps({"reads": reads, "seen": seen}))
    """
)


def test_a_reader_never_sees_a_partial_current_file(registry, source, tmp_path):
    registry.promote(registry.publish(source))
    registry.publish(source)
    ready, stop, report = tmp_path / "ready", tmp_path / "stop", tmp_path / "report.json"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(registry.current_file), str(ready), str(stop), str(report)]
    )
    try:
        wait_until(ready.exists, message="the reader started")
        for index in range(200):
            registry.promote("v2" if index % 2 == 0 else "v1")
    finally:
        stop.touch()
        reader.wait(timeout=20)

    result = json.loads(report.read_text())
    assert result["reads"] > 0
    assert set(result["seen"]) <= {"v1\n", "v2\n"}, result["seen"]


PROMOTER = textwrap.dedent(
    """
    import sys
    from worker.registry import ModelRegistry

    registry = ModelRegistry(sys.argv[1])
    for index in range(int(sys.argv[2])):
        registry.promote(sys.argv[3] if index % 2 == 0 else sys.argv[4])
    """
)


def test_concurrent_promotions_keep_a_consistent_history(registry, source):
    for _ in range(4):
        registry.publish(source)
    promoters = [
        subprocess.Popen(
            [sys.executable, "-c", PROMOTER, str(registry.root), "40", *pair],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        for pair in (("v1", "v2"), ("v3", "v4"))
    ]
    assert [promoter.wait(timeout=60) for promoter in promoters] == [0, 0]

    history = registry.history()
    assert len(history) == 80  # promotions of the other process break runs, so none is a no-op
    for before, after in itertools.pairwise(history):
        assert after["previous"] == before["version"]
    assert registry.current() == history[-1]["version"]


def test_training_runs_are_appended_and_read_back_in_order(registry):
    registry.record_training_run({"promoted": "v2", "held_out": 0.9})
    registry.record_training_run({"promoted": None, "held_out": 0.4})

    assert [run["promoted"] for run in registry.training_runs()] == ["v2", None]
    assert ModelRegistry(registry.root).training_runs()[1]["held_out"] == 0.4


def test_each_move_of_the_pointer_is_logged_with_what_was_served_before(registry, source, caplog):
    registry.publish(source)
    registry.publish(source)
    with caplog.at_level(logging.INFO, logger="worker.registry"):
        registry.promote("v1")
        registry.promote("v2")
        registry.rollback()

    assert [record.getMessage() for record in caplog.records if record.name == "worker.registry"] == [
        "promote: now serving model version v1 (was None)",
        "promote: now serving model version v2 (was v1)",
        "rollback: now serving model version v1 (was v2)",
    ]


def test_registry_refusals_word_for_word(registry, source):
    with pytest.raises(UnknownVersion) as refusal:
        registry.path("v1")
    assert str(refusal.value) == f"model version 'v1' not found in {registry.versions_dir} (known: none)"
    registry.publish(source)
    registry.publish(source)
    with pytest.raises(UnknownVersion, match=r"\(known: v1, v2\)$"):
        registry.path("v3")
    with pytest.raises(RegistryError) as refusal:
        registry.path("../v1")
    assert str(refusal.value) == (
        "invalid model version name '../v1': use letters, digits, '.', '_' and '-' "
        "(not starting with '.' or '-', at most 100 characters)"
    )
