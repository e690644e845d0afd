"""The metrics and the gate on the free-text world (tests/free_text_world.py), where every caption is
written one of several ways: exact match cannot tell models apart there, CIDEr-D can, and the gate
promotes a genuinely better candidate and refuses a worse one or one that forgets an old skill."""

from __future__ import annotations

import random
import shutil

import pytest

from roi_contract.project import ProjectSettings
from roi_model.evaluation import evaluate_records
from roi_model.text_metrics import captioning_metrics, gate_metric, java_available, score_pairs
from tests.free_text_world import ScriptedModel, free_text_world, read
from worker.finetune import GateThresholds, gate, scores_of

OTHER_COLOUR = {
    "red": "blue",
    "blue": "green",
    "green": "red",
    "yellow": "purple",
    "purple": "orange",
    "orange": "yellow",
}


def short_answer(kind, objects, reference):
    return reference  # every model here knows the short answers, unless a test says otherwise


def knows_captions(kind, objects, reference):
    """Right about every region, in its own words (never the annotator's phrasing)."""
    if kind == "caption":
        o = objects[0]
        return f"{o['size']} {o['colour']} {o['shape']}"
    return short_answer(kind, objects, reference)


def wrong_colour_every(n):
    counter = iter(range(10**6))

    def answer(kind, objects, reference):
        if kind == "caption":
            o = objects[0]
            colour = OTHER_COLOUR[o["colour"]] if next(counter) % n == 0 else o["colour"]
            return f"{o['size']} {colour} {o['shape']}"
        return short_answer(kind, objects, reference)

    return answer


def forgets_left(kind, objects, reference):
    if kind == "left":
        return {"yes": "no", "no": "yes"}[reference]
    return knows_captions(kind, objects, reference)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("free-text")
    held_out = read(free_text_world(root / "held-out", 24, seed=71))
    replay = read(free_text_world(root / "replay", 12, seed=72, caption_share=0.2))
    yield held_out, replay
    shutil.rmtree(root)


def scored(records, replay, answer):
    # The model is asked the held-out questions, then the replay ones.
    return scores_of(ScriptedModel(records + (replay or []), answer), records, replay, java=False)


def test_exact_match_cannot_judge_free_text_captions_but_cider_d_can(world):
    held_out, _ = world
    better = evaluate_records(ScriptedModel(held_out, knows_captions), held_out, java=False)["per_kind"][
        "caption"
    ]
    worse = evaluate_records(ScriptedModel(held_out, wrong_colour_every(2)), held_out, java=False)[
        "per_kind"
    ]["caption"]
    assert better["questions"] >= 30
    # Exact match: both about 0, the right model no better than the wrong one.
    assert better["exact_match"] < 0.2 and abs(better["exact_match"] - worse["exact_match"]) < 0.1
    # The captioning metrics see the difference, CIDEr-D most clearly.
    assert better["cider_d"] > worse["cider_d"] + 0.3
    for metric in ("bleu4", "rouge_l", "token_f1"):
        assert better[metric] > worse[metric], metric
    assert better["meteor"] is None and "Java" in better["meteor_unavailable"]


def test_the_gate_promotes_a_better_candidate_and_refuses_a_worse_one(world):
    held_out, replay = world
    served = scored(held_out, replay, wrong_colour_every(3))
    better = scored(held_out, replay, knows_captions)
    worse = scored(held_out, replay, wrong_colour_every(2))
    assert better.held_out_kinds["caption"]["metric"] == "cider_d"

    promoted, why = gate(better, served)
    assert promoted, why
    assert "caption cider_d" in why
    refused, why = gate(worse, served)
    assert not refused
    assert why.startswith("held-out caption cider_d fell from")


def test_the_gate_refuses_a_candidate_that_forgets_an_old_skill_on_replay(world):
    held_out, replay = world
    served = scored(held_out, replay, wrong_colour_every(3))
    forgetful = scores_of(ScriptedModel(held_out, knows_captions), held_out, None, java=False)
    forgetful = type(forgetful)(
        forgetful.held_out,
        None,
        forgetful.held_out_kinds,
        scored(replay, None, forgets_left).held_out_kinds,
    )
    promoted, why = gate(forgetful, served)
    assert not promoted
    assert why.startswith("replay left exact_match fell from 1.0000 to 0.0000")


def test_the_projects_training_settings_choose_the_metric_and_the_tolerance(world):
    held_out, _ = world
    settings = ProjectSettings.from_extra_params(
        {"train": {"gate": {"metrics": {"caption": "token_f1"}, "held_out_tolerance": 0.5}}}
    )
    thresholds = GateThresholds.from_settings(settings.train.gate)
    assert (thresholds.metrics, thresholds.held_out_tolerance, thresholds.replay_tolerance) == (
        {"caption": "token_f1"},
        0.5,
        0.01,
    )
    served = scores_of(
        ScriptedModel(held_out, knows_captions), held_out, None, thresholds.metrics, java=False
    )
    worse = scores_of(
        ScriptedModel(held_out, wrong_colour_every(2)), held_out, None, thresholds.metrics, java=False
    )
    assert worse.held_out_kinds["caption"]["metric"] == "token_f1"
    promoted, why = gate(worse, served, thresholds)  # within the generous tolerance
    assert promoted, why
    promoted, why = gate(worse, served, GateThresholds(metrics={"caption": "token_f1"}))
    assert not promoted and "caption token_f1 fell" in why
    with pytest.raises(ValueError, match=r"gate\.metrics"):
        ProjectSettings.from_extra_params({"train": {"gate": {"metrics": {"caption": "accuracy"}}}})


def test_short_answer_kinds_are_judged_by_exact_match():
    assert gate_metric("colour") == gate_metric("classification") == "exact_match"
    assert gate_metric("caption") == gate_metric("region_qa") == gate_metric("reasoning") == "cider_d"
    assert set(score_pairs("colour", [("red", "red")])) == {"questions", "exact_match", "token_f1"}


@pytest.mark.skipif(not java_available(), reason="no Java runtime: METEOR and the PTB tokenizer need one")
def test_with_java_meteor_and_the_ptb_tokenizer_are_pycocoevalcaps():
    rng = random.Random(3)
    pairs = [("a large red circle", "a big red round shape"), ("a small blue square", "tiny blue box")]
    scores = captioning_metrics(pairs + [(p, r) for p, r in rng.sample(pairs, 2)])
    assert scores["tokenizer"] == "ptb"
    assert 0 < scores["meteor"] < 1
    assert "meteor_unavailable" not in scores
