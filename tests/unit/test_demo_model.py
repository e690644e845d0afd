"""The shipped demo model (models/demo) meets its targets on a world of a seed it never saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roi_model.cli import main as cli_main
from roi_model.engine import RegionEngine
from roi_model.evaluation import evaluate_records
from roi_model.synthetic import generate_world
from roi_model.training import read_records

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
FRESH_SEED = 20261128


@pytest.fixture(scope="module")
def fresh_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh-world")
    card = json.loads((DEMO / "card.json").read_text())
    held_back = {key: set(values) for key, values in card["training"]["train_world"]["exclude"].items()}
    generate_world(out, 320, FRESH_SEED, exclude=held_back)
    return out


@pytest.fixture(scope="module")
def metrics(fresh_world):
    return evaluate_records(RegionEngine.from_pretrained(DEMO), read_records([fresh_world / "data.jsonl"]))


def exact_match(metrics: dict, kinds: tuple[str, ...]) -> tuple[float, int]:
    scores = [metrics["per_kind"][kind] for kind in kinds]
    questions = sum(score["questions"] for score in scores)
    return sum(score["exact_match"] * score["questions"] for score in scores) / questions, questions


def test_the_demo_model_is_small_and_documented():
    assert sum(path.stat().st_size for path in DEMO.iterdir()) <= 30 * 1024 * 1024
    card = json.loads((DEMO / "card.json").read_text())
    assert card["training"]["command"] == "make demo-model"
    assert card["training"]["minutes"] <= 20
    assert {"seed", "images"} <= set(card["training"]["train_world"])
    assert card["metrics"]["per_kind"]["caption"]["exact_match"] >= 0.95


def test_captions_on_at_least_500_held_out_regions(metrics):
    accuracy, questions = exact_match(metrics, ("caption",))
    assert questions >= 500
    assert accuracy >= 0.95, metrics["examples_wrong"]


def test_attribute_questions(metrics):
    accuracy, _ = exact_match(metrics, ("colour", "shape", "size"))
    assert accuracy >= 0.97, metrics["examples_wrong"]


def test_two_region_relations(metrics):
    accuracy, _ = exact_match(metrics, ("left", "larger"))
    assert accuracy >= 0.90, metrics["examples_wrong"]


def test_describe_gives_the_right_caption(fresh_world, capsys):
    record = read_records([fresh_world / "data.jsonl"])[0]
    x1, y1, x2, y2 = record["regions"][0]
    box = f"{x1 / record['width']},{y1 / record['height']},{x2 / record['width']},{y2 / record['height']}"
    assert (
        cli_main(
            ["describe", "--model", str(DEMO), "--image", str(fresh_world / record["image"]), "--box", box]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)["answers"][0]["text"]
    obj = record["objects"][0]
    assert answer == f"a {obj['size']} {obj['colour']} {obj['shape']}"
