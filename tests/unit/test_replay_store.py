"""Replay for every model (issue 17, part 3): the registry keeps each version's training set and its held-out
slice content-addressed, users register benchmarks, and the gate evaluates a candidate on all of them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.free_text_world import ScriptedModel, free_text_world, read
from worker.finetune import Scores, gate, replay_sample, scores_of
from worker.replay_store import ReplayStore, replay_sets

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay-worlds")
    yield free_text_world(root / "a", 6, seed=81), free_text_world(root / "b", 6, seed=82)
    shutil.rmtree(root)


def test_a_dataset_is_stored_once_by_content_with_its_images(worlds, tmp_path):
    data, _ = worlds
    store = ReplayStore(tmp_path)
    digest = store.store(data)
    assert store.store(data) == digest  # the same records: the same directory
    copy = tmp_path / "copy"
    shutil.copytree(data.parent, copy)
    assert store.store(copy / "data.jsonl") == digest  # where they came from does not matter
    records = read(store.path(digest))
    assert len(records) == 6
    for record in records:
        assert (Path(record["_root"]) / record["image"]).resolve().parent == store.images_dir.resolve()
    assert len(list(store.images_dir.iterdir())) == 6


def test_add_benchmark_registers_a_file_for_the_gate(worlds, tmp_path):
    _, benchmark = worlds
    done = subprocess.run(
        [sys.executable, "-m", "roi_model.cli", "registry", "--model-dir", str(tmp_path), "add-benchmark",
         str(benchmark), "--name", "shapes"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    added = json.loads(done.stdout)
    assert added["name"] == "shapes" and added["digest"].startswith("sha256:")
    store = ReplayStore(tmp_path)
    assert store.benchmarks() == {"shapes": added["digest"]}
    card = {"datasets": [{"project": 3, "train": added["digest"], "held_out": added["digest"]}]}
    assert sorted(replay_sets(store, card)) == [
        "benchmark shapes",
        f"held-out of project 3 ({added['digest'][7:19]})",
    ]

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "x"}\n')
    refused = subprocess.run(
        [sys.executable, "-m", "roi_model.cli", "registry", "--model-dir", str(tmp_path), "add-benchmark", str(broken)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert refused.returncode != 0 and "Traceback" not in refused.stderr


def test_a_fine_tuned_cards_datasets_are_its_replay_training_data(worlds, tmp_path):
    first, second = worlds
    store = ReplayStore(tmp_path / "models")
    card = {"datasets": [{"project": 1, "train": store.store(first), "held_out": store.store(second)}]}
    train, evaluation = replay_sample(card, tmp_path / "replay", 100, store)
    assert len(read(train)) + len(read(evaluation)) == 6  # the train side only


def right(kind, objects, reference):
    if kind == "caption":
        o = objects[0]
        return f"{o['size']} {o['colour']} {o['shape']}"
    return reference


def forgets_shapes(kind, objects, reference):
    if kind == "caption":
        o = objects[0]
        return f"{o['size']} {o['colour']} blob"
    return "blob" if kind == "shape" else reference


def test_the_gate_refuses_a_drop_on_any_replay_set_and_names_it(worlds):
    project, benchmark = worlds
    held_out, sets = read(project), {"benchmark shapes": read(benchmark)}
    everything = held_out + sets["benchmark shapes"]
    served = scores_of(ScriptedModel(everything, right), held_out, None, sets=sets, java=False)
    # Just as good on the project's tasks, but it forgot the shapes of the benchmark.
    candidate = scores_of(ScriptedModel(held_out, right), held_out, None, java=False)
    forgot = scores_of(
        ScriptedModel(sets["benchmark shapes"], forgets_shapes), sets["benchmark shapes"], None, java=False
    )
    forgetful = Scores(
        candidate.held_out, None, candidate.held_out_kinds, {}, {"benchmark shapes": forgot.held_out_kinds}
    )
    promoted, why = gate(forgetful, served)
    assert not promoted
    assert why.startswith("replay set 'benchmark shapes': ")
    kept = scores_of(ScriptedModel(everything, right), held_out, None, sets=sets, java=False)
    promoted, why = gate(kept, served)
    assert promoted and "1 replay sets kept" in why
