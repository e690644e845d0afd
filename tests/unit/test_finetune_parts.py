"""The pieces of the fine-tuning job: the task split, the gate, replay data, acceptance, the registry CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roi_contract.project import GateSettings
from roi_contract.records import is_held_out
from roi_model.synthetic import generate_world
from roi_model.training import read_records
from worker.finetune import (
    REPLAY_TOLERANCE,
    GateThresholds,
    Scores,
    acceptance_by_version,
    gate,
    replay_sample,
    split_by_task,
)
from worker.registry import ModelRegistry
from worker.registry_cli import plot_report


def test_the_split_is_fixed_by_task_id_and_holds_out_about_a_quarter():
    decisions = [is_held_out(task) for task in range(2000)]
    assert decisions == [is_held_out(task) for task in range(2000)]
    assert 0.2 < sum(decisions) / len(decisions) < 0.3


def test_split_by_task_keeps_every_record_of_a_task_together(tmp_path):
    lines = [
        {"id": f"ls:1:{task}:{annotation}", "source": {"task": task}}
        for task in range(40)
        for annotation in (1, 2)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    train, held_out = split_by_task(data)
    train_tasks = {json.loads(line)["source"]["task"] for line in train.read_text().splitlines()}
    held_out_tasks = {json.loads(line)["source"]["task"] for line in held_out.read_text().splitlines()}
    assert train_tasks.isdisjoint(held_out_tasks) and train_tasks | held_out_tasks == set(range(40))
    assert held_out_tasks == {task for task in range(40) if is_held_out(task)}


@pytest.mark.parametrize(
    ("candidate", "current", "promoted", "why"),
    [
        (Scores(0.90, 0.97), Scores(0.60, 0.98), True, "held-out 0.6000 -> 0.9000"),
        (Scores(0.60, 0.98), Scores(0.60, 0.98), True, "held-out"),
        (Scores(0.59, 0.99), Scores(0.60, 0.98), False, "held-out exact match fell"),
        (Scores(0.90, 0.98 - REPLAY_TOLERANCE - 0.001), Scores(0.60, 0.98), False, "replay exact match fell"),
        (Scores(0.90, None), Scores(0.60, None), True, "held-out"),
    ],
)
def test_the_gate(candidate, current, promoted, why):
    decision, reason = gate(candidate, current)
    assert decision is promoted and why in reason


def per_kind(**values) -> dict[str, dict]:
    """{"caption": (metric, value), ...} as Scores hold them."""
    return {kind: {"metric": metric, "value": value} for kind, (metric, value) in values.items()}


SERVED = Scores(
    0.5,
    0.9,
    held_out_kinds=per_kind(caption=("cider_d", 1.0), left=("exact_match", 0.5)),
    replay_kinds=per_kind(caption=("cider_d", 2.0), left=("exact_match", 0.9)),
    replay_sets={"benchmark mini": per_kind(left=("exact_match", 0.8))},
)


def candidate(held_out=None, replay=None, sets=None) -> Scores:
    """SERVED with some per-kind figures changed (the exact-match totals are not looked at then)."""
    return Scores(
        0.0,
        0.0,
        held_out_kinds={**SERVED.held_out_kinds, **per_kind(**(held_out or {}))},
        replay_kinds={**SERVED.replay_kinds, **per_kind(**(replay or {}))},
        replay_sets={
            name: {**kinds, **per_kind(**(sets or {}))} for name, kinds in SERVED.replay_sets.items()
        },
    )


@pytest.mark.parametrize(
    ("scores", "thresholds", "promoted", "reason"),
    [
        (
            candidate(held_out={"caption": ("cider_d", 1.5)}),
            None,
            True,
            "held-out caption cider_d 1.0 -> 1.5, left exact_match 0.5 -> 0.5; "
            "replay caption cider_d 2.0 -> 2.0, left exact_match 0.9 -> 0.9; 1 replay sets kept",
        ),
        (
            candidate(held_out={"caption": ("cider_d", 0.99)}),
            None,
            False,
            "held-out caption cider_d fell from 1.0000 to 0.9900",
        ),
        (  # a tolerance is a share of the metric's range: CIDEr-D's is 0..10
            candidate(held_out={"caption": ("cider_d", 0.9), "left": ("exact_match", 0.45)}),
            GateThresholds(held_out_tolerance=0.01),
            False,
            "held-out left exact_match fell from 0.5000 to 0.4500, more than 0.01",
        ),
        (
            candidate(held_out={"caption": ("cider_d", 0.9), "left": ("exact_match", 0.49)}),
            GateThresholds(held_out_tolerance=0.01),
            True,
            "held-out caption cider_d 1.0 -> 0.9, left exact_match 0.5 -> 0.49",
        ),
        (
            candidate(held_out={"caption": ("cider_d", 0.89)}),
            GateThresholds(held_out_tolerance=0.01),
            False,
            "held-out caption cider_d fell from 1.0000 to 0.8900, more than 0.1",
        ),
        (
            candidate(replay={"left": ("exact_match", 0.889)}),
            None,
            False,
            f"replay left exact_match fell from 0.9000 to 0.8890, more than {REPLAY_TOLERANCE:g}",
        ),
        (candidate(replay={"left": ("exact_match", 0.89)}), None, True, "replay caption cider_d 2.0 -> 2.0"),
        (
            candidate(sets={"left": ("exact_match", 0.7)}),
            None,
            False,
            "replay set 'benchmark mini': left exact_match fell from 0.8000 to 0.7000, more than 0.01",
        ),
        (  # a kind that cannot be compared does not stop the comparison of the next
            candidate(held_out={"caption": ("cider_d", None), "left": ("exact_match", 0.4)}),
            None,
            False,
            "held-out left exact_match fell from 0.5000 to 0.4000",
        ),
        (  # a figure not computed, or computed with another metric, is not compared
            candidate(held_out={"caption": ("cider_d", None), "left": ("token_f1", 0.1)}),
            None,
            True,
            "held-out caption cider_d 1.0 -> None, left exact_match 0.5 -> 0.1",
        ),
    ],
    ids=[
        "better",
        "worse-caption",
        "worse-beyond-tolerance",
        "within-tolerance",
        "cider-beyond-tolerance",
        "replay-worse",
        "replay-within",
        "replay-set-worse",
        "next-after-not-comparable",
        "not-comparable",
    ],
)
def test_the_gate_per_kind(scores, thresholds, promoted, reason):
    decision, why = gate(scores, SERVED, thresholds)
    assert decision is promoted
    if promoted:
        assert reason in why  # the summary of what was compared
    else:
        assert why == reason


def test_the_gate_compares_only_the_kinds_both_versions_have():
    new_kind = Scores(
        0.0, None, held_out_kinds=per_kind(caption=("cider_d", 1.2), colour=("exact_match", 0.0))
    )

    assert gate(new_kind, SERVED) == (True, "held-out caption cider_d 1.0 -> 1.2")
    # Without per-kind figures on one side, the overall exact match decides.
    assert gate(Scores(0.5, None), SERVED) == (True, "held-out 0.5000 -> 0.5000")
    assert gate(Scores(0.49, None), SERVED)[0] is False
    assert gate(Scores(0.9, 0.97), Scores(0.6, 0.98)) == (
        True,
        "held-out 0.6000 -> 0.9000, replay 0.9800 -> 0.9700",
    )


def test_gate_thresholds_from_a_projects_settings_keep_the_defaults_it_leaves_out():
    assert GateThresholds.from_settings(GateSettings(held_out_tolerance=0.05)) == GateThresholds(
        held_out_tolerance=0.05
    )
    assert GateThresholds.from_settings(GateSettings()) == GateThresholds()


def test_replay_of_a_synthetic_world_regenerates_its_first_images(tmp_path):
    world = {"seed": 7, "images": 500, "kind_weights": None, "exclude": {"colour": ["purple"]}}
    train, evaluation = replay_sample(
        {"version": "v1", "training": {"train_world": world}}, tmp_path / "replay", 12
    )
    original = tmp_path / "original"
    generate_world(original, 12, 7, exclude={"colour": {"purple"}})
    replayed = read_records([train]) + read_records([evaluation])
    assert len(replayed) == 12 and len(read_records([evaluation])) == 3
    originals = {record["id"]: record for record in read_records([original / "data.jsonl"])}
    for record in replayed:
        assert record["conversations"] == originals[record["id"]]["conversations"]
        assert (original / originals[record["id"]]["image"]).read_bytes() == Path(
            record["image"]
        ).read_bytes()
    assert all(obj["colour"] != "purple" for record in replayed for obj in record["objects"])


def test_replay_of_a_fine_tuned_version_reads_its_training_files(tmp_path):
    generate_world(tmp_path / "data", 8, 3)
    card = {"version": "v2", "replay": {"kind": "files", "files": [str(tmp_path / "data" / "data.jsonl")]}}
    train, evaluation = replay_sample(card, tmp_path / "replay", 100)
    assert len(read_records([train])) + len(read_records([evaluation])) == 8
    assert replay_sample({"version": "v0"}, tmp_path / "none", 10) == (None, None)


def test_acceptance_counts_unchanged_proposals_per_version(tmp_path):
    def record(version, origins):
        turns = [
            turn
            for origin in origins
            for turn in (
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a", "source": {"origin": origin}},
            )
        ]
        return {"source": {"model_version": version}, "conversations": turns}

    lines = [
        record("v1", ["prediction", "prediction-changed", "manual"]),
        record("v1", ["prediction"]),
        record("v2", ["prediction-changed"]),
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = acceptance_by_version(data)
    assert {
        version: {k: tally[k] for k in ("proposals", "accepted", "rate")}
        for version, tally in figures.items()
    } == {
        "v1": {"proposals": 3, "accepted": 2, "rate": 0.6667},
        "v2": {"proposals": 1, "accepted": 0, "rate": 0.0},
    }


def test_the_effort_of_each_version_is_the_characters_its_reviewers_typed_or_deleted(tmp_path):
    """Per version: the edit distance from each proposal to the answer the reviewer kept (0 for one accepted
    unchanged), in characters and normalised by the longer text; a changed proposal whose suggestion the
    export does not know is counted apart, not as 0."""

    def record(version, *answers):
        turns = []
        for origin, suggestion, final in answers:
            source = {"origin": origin, "suggestion": suggestion}
            turns += [{"from": "human", "value": "q"}, {"from": "gpt", "value": final, "source": source}]
        return {"source": {"model_version": version}, "conversations": turns}

    lines = [
        record(
            "v1",
            ("prediction", None, "a red circle"),
            ("prediction-changed", "a red circle", "a blue circle"),
        ),
        record("v1", ("prediction-changed", None, "a square"), ("manual", None, "typed by hand")),
        record("v2", ("prediction-changed", "small", "a small green star")),
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = acceptance_by_version(data)
    # "a red circle" -> "a blue circle": red -> blue, three substitutions and one insertion
    assert figures["v1"] == {
        "proposals": 3,
        "accepted": 1,
        "rate": 0.3333,
        "edited_characters": 4,
        "edit_distance": round((0 + 4 / 13) / 2, 4),
        "edits_unknown": 1,
    }
    assert figures["v2"]["edited_characters"] == len("a  green star")
    assert figures["v2"]["edit_distance"] == round(13 / 18, 4)


def test_registry_report_draws_versions_and_runs(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    first = registry.publish(source, metrics={"exact_match": 0.6})
    registry.promote(first)
    second = registry.publish(source, parent=first, metrics={"held_out_exact_match": 0.9})
    registry.promote(second)
    run = {
        "at": "2026-11-28T04:00:00+00:00",
        "parent": first,
        "promoted": second,
        "acceptance": {first: {"rate": 0.4, "edit_distance": 0.25}},
    }
    registry.record_training_run(run)
    drawn = plot_report(registry, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn == [
        "held-out exact match",
        "proposals accepted unchanged",
        "reviewers' edits (normalised edit distance)",
    ]
    registry.record_training_run(run | {"acceptance": {first: {"rate": 0.5}}})  # a run of before the edits
    assert len(plot_report(registry, tmp_path / "report.png")) == 3
