"""LoRA adapters on the served base: roi_model.adapters, and the model host's adapter cache (worker.model_host).

Everything runs on the demo model (models/demo) with adapters of random weights (tests/unit/tiny_adapters.py),
and one adapter trained for real by roi_model.training with adapter_only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_adapters import DEMO, random_adapter

from roi_model.adapters import AdapterError, AdapterSet, check_adapter_dir, parameters_digest
from roi_model.engine import ImageRequest, RegionQuery
from roi_model.families import load_region_model
from roi_model.generation import GenerationOptions
from roi_model.synthetic import generate_world
from roi_model.training import TrainOptions, read_records, train
from worker.model_host import ModelHost
from worker.registry import ModelRegistry

SHORT = GenerationOptions(max_new_tokens=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, 4, seed=31)
    return out


def requests_of(world: Path, first: int = 0, count: int = 2) -> list[ImageRequest]:
    requests = []
    for record in read_records([world / "data.jsonl"])[first : first + count]:
        image = Image.open(world / record["image"]).convert("RGB")
        width, height = image.size
        queries = [
            RegionQuery("Describe <region1> briefly.", [[x1 / width, y1 / height, x2 / width, y2 / height]])
            for x1, y1, x2, y2 in record["regions"][:2]
        ]
        requests.append(ImageRequest(image, queries, SHORT))
    return requests


def texts(answers) -> list[list[str]]:
    return [[answer.text for answer in request] for request in answers]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Three adapters of the demo model, by name."""
    out = tmp_path_factory.mktemp("adapters")
    language_model = load_region_model(DEMO).model.language_model
    return {
        name: random_adapter(language_model, out / name, seed) for seed, name in enumerate("abc", start=1)
    }


# --- roi_model.adapters -----------------------------------------------------------------------------------


def test_each_adapter_answers_as_itself_and_switched_off_the_base_answers_bit_for_bit(world, adapters):
    requests = requests_of(world)
    alone = {}
    for name in "ab":  # each adapter alone on a fresh base
        engine = load_region_model(DEMO)
        loaded = AdapterSet(engine)
        loaded.load(name, adapters[name])
        loaded.activate(name)
        alone[name] = texts(engine.answer(requests))

    engine = load_region_model(DEMO)
    base = engine.answer(requests)
    digest = parameters_digest(engine.model)
    loaded = AdapterSet(engine)
    for name in "ab":
        assert loaded.load(name, adapters[name]) > 0
    assert loaded.active is None
    assert [[(a.text, a.score) for a in r] for r in engine.answer(requests)] == [
        [(a.text, a.score) for a in r] for r in base
    ]
    # switching back and forth on the same images: each adapter's own answers (no prefix cache shared)
    for name in "abab":
        loaded.activate(name)
        assert texts(engine.answer(requests)) == alone[name]
    assert alone["a"] != alone["b"] != texts(base)
    loaded.activate(None)
    assert texts(engine.answer(requests)) == texts(base)
    for name in "ab":
        loaded.unload(name)
    assert loaded.loaded == {} and parameters_digest(engine.model) == digest
    assert type(engine.model.language_model).__name__ == "LlamaForCausalLM"


def test_ready_weights_are_kept_within_their_bytes_and_rewritten_for_the_next_adapter(world, adapters):
    """Within ready_bytes a switch is a pointer swap (the same tensors, nothing computed); beyond it the least
    recently activated adapter's buffers are rewritten for the next, and every adapter still answers as
    itself. Below one adapter's size, the active one's are kept all the same."""
    requests = requests_of(world, count=1)
    engine = load_region_model(DEMO)
    probe = AdapterSet(engine)
    probe.load("a", adapters["a"])
    probe.activate("a")
    one = probe.ready_bytes_used
    alone = {"a": texts(engine.answer(requests))}
    probe.unload("a")
    assert probe.ready_bytes_used == 0

    engine = load_region_model(DEMO)
    loaded = AdapterSet(engine, ready_bytes=2 * one)  # room for two adapters' ready weights
    for name in "abc":
        loaded.load(name, adapters[name])
    layers = dict(engine.model.language_model.named_modules())
    targeted = next(iter(loaded._deltas["a"]))

    def weight_of_a_targeted_layer():
        return layers[targeted].weight

    loaded.activate("a")
    weight_a = weight_of_a_targeted_layer()
    loaded.activate("b")
    weight_b = weight_of_a_targeted_layer()
    loaded.activate("a")
    assert weight_of_a_targeted_layer() is weight_a and loaded.ready_bytes_used == 2 * one
    assert texts(engine.answer(requests)) == alone["a"]
    loaded.activate("c")  # evicts b's, the least recently activated, and takes its buffers
    assert weight_of_a_targeted_layer() is weight_b and loaded.ready_bytes_used == 2 * one
    loaded.activate("b")  # b again: computed again, into a's buffers
    assert weight_of_a_targeted_layer() is weight_a
    loaded.activate("a")
    assert texts(engine.answer(requests)) == alone["a"]

    engine = load_region_model(DEMO)
    tight = AdapterSet(engine, ready_bytes=1)
    for name in "ab":
        tight.load(name, adapters[name])
    for name in "abba":
        tight.activate(name)
        assert tight.ready_bytes_used == one
    assert texts(engine.answer(requests)) == alone["a"]


def test_an_active_adapter_answers_as_peft_applies_it(world, adapters):
    from peft import PeftModel

    requests = requests_of(world)
    with_peft = load_region_model(DEMO)
    PeftModel.from_pretrained(with_peft.model.language_model, str(adapters["a"]))  # LoRA layers, in place
    expected = with_peft.answer(requests)
    engine = load_region_model(DEMO)
    loaded = AdapterSet(engine)
    loaded.load("a", adapters["a"])
    loaded.activate("a")
    got = engine.answer(requests)
    assert texts(got) == texts(expected)
    assert [a.score for r in got for a in r] == pytest.approx(
        [a.score for r in expected for a in r], abs=1e-4
    )
    assert loaded.ready_bytes_used > 0 and loaded.loaded["a"] < loaded.ready_bytes_used


def test_a_merged_adapter_answers_as_the_adapter_and_refuses_others(world, adapters):
    requests = requests_of(world)
    engine = load_region_model(DEMO)
    loaded = AdapterSet(engine)
    loaded.load("a", adapters["a"])
    loaded.load("b", adapters["b"])
    loaded.activate("a")
    expected = texts(engine.answer(requests))
    loaded.merge("a")
    assert loaded.loaded == {} and loaded.merged == "a"
    assert texts(engine.answer(requests)) == expected
    assert not any("lora_" in name for name, _ in engine.model.named_parameters())
    with pytest.raises(AdapterError, match="merged"):
        loaded.load("c", adapters["c"])
    with pytest.raises(AdapterError, match="merged"):
        loaded.activate(None)


def test_only_pure_lora_adapters_are_served(tmp_path, adapters):
    check_adapter_dir(adapters["a"])
    with pytest.raises(AdapterError, match="not a peft adapter"):
        check_adapter_dir(tmp_path)
    changes_base = tmp_path / "changes-base"
    changes_base.mkdir()
    (changes_base / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file(
        {"base_model.model.lm_head.weight": torch.zeros(2, 2)},
        str(changes_base / "adapter_model.safetensors"),
    )
    with pytest.raises(AdapterError, match="would change the shared base"):
        check_adapter_dir(changes_base)
    (changes_base / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "modules_to_save": ["lm_head"]})
    )
    with pytest.raises(AdapterError, match="modules_to_save"):
        check_adapter_dir(changes_base)


def test_training_an_adapter_alone_leaves_the_base_and_writes_lora_weights_only(tmp_path, world):
    summary = train(
        TrainOptions(
            data=[world / "data.jsonl"],
            out=tmp_path / "adapter",
            init=DEMO,
            stage="lora",
            adapter_only=True,
            steps=2,
            batch_size=2,
            warmup_steps=0,
            save_every=2,
            lora_rank=4,
        )
    )
    assert summary["steps"] == 2
    check_adapter_dir(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="lora stage"):
        TrainOptions(data=[], out=tmp_path, init=DEMO, stage="full", adapter_only=True)


# --- the model host ---------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path, adapters) -> ModelRegistry:
    """The demo model as base, and projects 1, 2, 3 with adapters a, b, c promoted."""
    registry = ModelRegistry(tmp_path / "models")
    registry.import_model(DEMO, version="demo-1")
    for project, name in enumerate("abc", start=1):
        lineage = registry.lineage(project)
        lineage.promote(lineage.publish(adapters[name], extra={"base": "demo-1", "project": project}))
    return registry


def test_the_host_serves_each_project_its_adapter_and_loads_each_once(registry, world):
    requests = requests_of(world)
    host = ModelHost(registry)
    host.load()
    engine, version = host.serve(None)
    base = texts(engine.answer(requests))
    assert version == "demo-1"
    assert host.serve(9)[1] == "demo-1"  # never trained: the base
    answers = {}
    for project in (1, 2, 1, 2, 1):
        engine, version = host.serve(project)
        answers.setdefault(version, texts(engine.answer(requests)))
        assert texts(engine.answer(requests)) == answers[version]
    assert sorted(answers) == ["demo-1+p1-v1", "demo-1+p2-v1"]
    assert host.adapter_loads == 2  # the repeats found their adapter loaded
    assert texts(host.serve(9)[0].answer(requests)) == base
    assert answers["demo-1+p1-v1"] != base


def test_the_adapter_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used(registry):
    probe = ModelHost(registry)
    probe.load()
    probe.serve(1)
    size, ready = probe.adapter_stats()["bytes"], probe.adapter_stats()["ready_bytes"]
    host = ModelHost(registry, adapter_cache_bytes=2 * size)  # room for two
    host.load()
    for project in (1, 2, 1, 3):  # 3 evicts 2, the least recently used, and its ready weights go with it
        host.serve(project)
    assert host.adapter_stats() == {
        "loaded": 2,
        "bytes": 2 * size,
        "max_bytes": 2 * size,
        "ready_bytes": 2 * ready,
        "loads": 3,
    }
    assert sorted(host._adapters.loaded) == ["p1-v1", "p3-v1"]
    host.serve(1)
    assert host.adapter_loads == 3
    host.serve(2)  # evicted before: loaded again, evicting 3
    assert host.adapter_loads == 4 and sorted(host._adapters.loaded) == ["p1-v1", "p2-v1"]
    with pytest.raises(ValueError, match="more than the whole adapter cache"):
        tiny = ModelHost(registry, adapter_cache_bytes=size // 2)
        tiny.load()
        tiny.serve(1)


def test_a_batch_that_mixes_projects_is_split_by_adapter(registry, world):
    requests = requests_of(world, count=4)
    host = ModelHost(registry)
    host.load()
    expected = {project: texts(host.serve(project)[0].answer(requests)) for project in (1, 2, None)}
    calls = []
    engine = host.engine
    original = engine.answer

    def counting(batch):
        calls.append((engine.variant, len(batch)))
        return original(batch)

    engine.answer = counting
    projects = [1, 2, None, 1]
    results = host.answer(list(zip(projects, requests, strict=True)))
    assert sorted(calls) == [("", 1), ("p1-v1", 2), ("p2-v1", 1)]  # one engine call per adapter
    for index, (project, (answers, version)) in enumerate(zip(projects, results, strict=True)):
        assert [answer.text for answer in answers] == expected[project][index]
        assert version == {1: "demo-1+p1-v1", 2: "demo-1+p2-v1", None: "demo-1"}[project]


def test_a_promotion_or_rollback_reaches_the_next_call_and_a_merged_worker_serves_one_project(
    registry, adapters, world
):
    requests = requests_of(world)
    host = ModelHost(registry)
    host.load()
    first = texts(host.serve(1)[0].answer(requests))
    lineage = registry.lineage(1)
    lineage.promote(lineage.publish(adapters["b"], extra={"base": "demo-1", "project": 1}))
    engine, version = host.serve(1)
    assert version == "demo-1+p1-v2" and texts(engine.answer(requests)) != first
    lineage.rollback()
    lineage.rollback()
    assert host.serve(1)[1] == "demo-1"

    merged = ModelHost(registry, merge_project=2)
    merged.load()
    engine, version = merged.serve(2)
    assert version == "demo-1+p2-v1"
    assert texts(engine.answer(requests)) == texts(host.serve(2)[0].answer(requests))
    with pytest.raises(ValueError, match="serves project 2 alone"):
        merged.serve(1)
    lineage = registry.lineage(2)
    lineage.promote(lineage.publish(adapters["c"], extra={"base": "demo-1", "project": 2}))
    assert merged.stale() and merged.refresh()
    assert merged.serve(2)[1] == "demo-1+p2-v2"
