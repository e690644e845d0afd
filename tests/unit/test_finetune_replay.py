"""The fine-tuning job's replay wiring, for a model that is not a synthetic-world card (an imported
GPT4RoI-architecture model): its first fine-tune is gated on the registered benchmarks, the promoted
version keeps its training set and held-out slice in the registry, and the next fine-tune replays that
training set and is gated on that held-out slice too. Export, training and scoring are stand-ins here
(tests/e2e/test_finetune_loop.py runs the real ones); everything between them is the job's own code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backend.settings import Settings
from tests.free_text_world import free_text_world
from worker import finetune as finetune_module
from worker import process_context
from worker.finetune import Scores, finetune
from worker.registry import ModelRegistry
from worker.replay_store import ReplayStore


class FakeRedis:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def get(self, key):
        return self.values.get(key)

    def set(self, key, value, **_):
        self.values[key] = value


@pytest.fixture
def job(tmp_path, monkeypatch):
    world = free_text_world(tmp_path / "world", 16, seed=91)
    benchmark = free_text_world(tmp_path / "benchmark", 4, seed=92)
    base = tmp_path / "gpt4roi-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt4roi"}))
    (base / "card.json").write_text(
        json.dumps({"version": "gpt4roi-base", "training": {"source": "imported"}})
    )
    model_dir = tmp_path / "models"
    ModelRegistry(model_dir).import_model(base, version="gpt4roi-base")
    ReplayStore(model_dir).add_benchmark(benchmark, "shapes")

    def export_project(client, project, out_dir, settings, params):
        shutil.copytree(world.parent, out_dir)
        lines = []
        for task, line in enumerate((out_dir / "data.jsonl").read_text().splitlines(), start=1):
            record = json.loads(line)
            record["source"] = {**record["source"], "task": task}
            lines.append(json.dumps(record))
        (out_dir / "data.jsonl").write_text("".join(line + "\n" for line in lines))
        return {"records": len(lines), "annotations_total": len(lines), "regions_exported": 0}

    calls = {"train": [], "score": []}

    def train(options):
        calls["train"].append([Path(path) for path in options.data])
        shutil.copytree(options.init, options.out)
        return {"diverged": False, "train_loss": 0.1}

    def score(model_dir, held_out, replay_eval, metrics=None, sets=None):
        calls["score"].append(sorted(sets or {}))
        kinds = {"caption": {"metric": "cider_d", "value": 1.0}}
        return Scores(1.0, None, kinds, {}, {name: kinds for name in sets or {}})

    monkeypatch.setattr(finetune_module, "export_project", export_project)
    monkeypatch.setattr(finetune_module, "train", train)
    monkeypatch.setattr(finetune_module, "score", score)
    settings = Settings(
        model_dir=model_dir,
        label_studio_url="http://127.0.0.1:9",
        label_studio_api_key="k",
        finetune_lineage="global",  # tests/unit/test_finetune_projects.py: the lineage of a project
    )
    process_context.activate(process_context.WorkerContext(settings=settings, connection=FakeRedis()))
    yield model_dir, calls
    process_context.activate(None)


def test_a_non_world_model_is_gated_on_its_replay_sets_and_keeps_its_training_set(job):
    model_dir, calls = job
    registry, store = ModelRegistry(model_dir), ReplayStore(model_dir)

    first = finetune(5)
    assert first["promoted"] == "v1", first["decision"]
    assert calls["score"] == [["benchmark shapes"], ["benchmark shapes"]]  # served and candidate
    [learned] = registry.card("v1")["datasets"]
    assert learned["project"] == 5
    assert store.path(learned["train"]).exists() and store.path(learned["held_out"]).exists()

    calls["score"].clear()
    second = finetune(5)
    assert second["promoted"] == "v2", second["decision"]
    held_out_set = f"held-out of project 5 ({learned['held_out'][7:19]})"
    assert calls["score"] == [["benchmark shapes", held_out_set]] * 2
    # The second run trained on the project's tasks plus a replay of the stored training set.
    assert len(calls["train"][1]) == 2 and calls["train"][1][1].name == "train.jsonl"
    assert "replay" in str(calls["train"][1][1])
    # The same tasks again: the same content, stored and listed once.
    assert registry.card("v2")["datasets"] == [learned]
