"""A project's fine-tune (worker.finetune, ROI_FINETUNE_LINEAGE=project): an adapter of that project alone.

Export, training and scoring are stand-ins (the real ones: tests/unit/test_adapters.py and the integration
test of two projects); the registry, the replay store and the gate are the real ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backend import registry_snapshot
from backend.settings import Settings
from tests.free_text_world import free_text_world
from tests.unit.test_finetune_replay import FakeRedis
from worker import finetune as finetune_module
from worker import process_context
from worker.finetune import Scores, finetune
from worker.registry import ModelRegistry

LORA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def job(tmp_path, monkeypatch):
    world = free_text_world(tmp_path / "world", 16, seed=91)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "region_llm"}))
    save_file({"weight": torch.ones(4)}, str(base / "model.safetensors"))
    model_dir = tmp_path / "models"
    ModelRegistry(model_dir).import_model(base, version="base-1")
    calls = {"train": [], "score": [], "held_out": 0.5}

    def export_project(client, project, out_dir, settings, params):
        shutil.copytree(world.parent, out_dir)
        lines = []
        for task, line in enumerate((out_dir / "data.jsonl").read_text().splitlines(), start=1):
            record = json.loads(line)
            record["source"] = {**record["source"], "task": task}
            lines.append(json.dumps(record))
        (out_dir / "data.jsonl").write_text("".join(line + "\n" for line in lines))
        return {"records": len(lines), "annotations_total": len(lines), "regions_exported": 0}

    def train(options):
        calls["train"].append(options)
        options.out.mkdir(parents=True)
        (options.out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        save_file({LORA_KEY: torch.zeros(2, 2)}, str(options.out / "adapter_model.safetensors"))
        if calls.get("touch_base"):
            save_file({"weight": torch.zeros(4)}, str(options.init / "model.safetensors"))
        return {"diverged": False, "train_loss": 0.1}

    def score(model_dir, held_out, replay_eval, metrics=None, sets=None, adapter=None):
        calls["score"].append((Path(model_dir).name, adapter and Path(adapter).name))
        # the candidate (an adapter of this run) scores calls["held_out"], what is served 0.5
        value = calls["held_out"] if adapter is not None and Path(adapter).name == "candidate" else 0.5
        kinds = {"caption": {"metric": "cider_d", "value": value}}
        return Scores(value, None, kinds, {}, {})

    monkeypatch.setattr(finetune_module, "export_project", export_project)
    monkeypatch.setattr(finetune_module, "train", train)
    monkeypatch.setattr(finetune_module, "score", score)
    settings = Settings(model_dir=model_dir, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k")
    assert settings.finetune_lineage == "project"  # the default
    process_context.activate(process_context.WorkerContext(settings=settings, connection=FakeRedis()))
    yield ModelRegistry(model_dir), calls
    process_context.activate(None)


def test_a_projects_fine_tune_promotes_an_adapter_for_that_project_alone(job):
    registry, calls = job
    run = finetune(5)
    assert run["promoted"] == "base-1+p5-v1", run["decision"]
    assert (run["lineage"], run["adapter"], run["parent"]) == ("project", "v1", "base-1")
    [options] = calls["train"]
    assert options.adapter_only and options.stage == "lora" and options.init == registry.path("base-1")
    # scored: the base alone (what project 5 is served), then the base with the candidate adapter
    assert calls["score"] == [("base-1", None), ("base-1", "candidate")]
    card = registry.lineage(5).card("v1")
    assert (card["base"], card["project"], card.get("parent")) == ("base-1", 5, None)
    assert card["base_digest"].startswith("sha256:")
    # every other project, and the global lineage, are served the base as before
    assert registry.current() == "base-1" and [c["version"] for c in registry.versions()] == ["base-1"]
    assert registry.serving(6).version == "base-1"
    assert registry.serving(5).version == "base-1+p5-v1"
    assert registry_snapshot.read(process_context.current().connection)["projects"] == {"5": "base-1+p5-v1"}

    # The next run is gated against the project's adapter and replays what that adapter learned.
    calls["score"].clear()
    second = finetune(5)
    assert second["promoted"] == "base-1+p5-v2" and second["parent"] == "base-1+p5-v1"
    assert calls["score"] == [("base-1", "v1"), ("base-1", "candidate")]
    assert registry.lineage(5).card("v2")["parent"] == "v1"
    assert any(entry["project"] == 5 for entry in registry.lineage(5).card("v2")["datasets"])


def test_a_worse_adapter_is_refused_and_the_project_keeps_what_it_had(job):
    registry, calls = job
    calls["held_out"] = 0.4
    run = finetune(5)
    assert run["promoted"] is None and "fell" in run["decision"]
    assert registry.serving(5).version == "base-1" and registry.lineage(5).versions() == []
    assert registry.training_runs()[-1]["project"] == 5


def test_a_run_that_changes_the_shared_base_is_refused(job):
    registry, calls = job
    calls["touch_base"] = True
    run = finetune(5)
    assert run["promoted"] is None
    assert run["decision"].startswith("the shared base's weights in"), run["decision"]
    assert registry.serving(5).version == "base-1"
