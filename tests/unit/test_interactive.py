"""backend.interactive: what each labeling scheme asks while an annotator draws boxes and types into them.

The contexts are shaped as Label Studio 1.23.2's editor sends them on regionFinishedDrawing: every box of the
same label on the image, with its per-region texts; a box drawn by hand has origin "manual".
"""

from __future__ import annotations

from pathlib import Path

from backend.interactive import plan_interactive
from backend.labeling import scheme_from_config
from roi_contract.project import Prompts

CONFIGS = Path(__file__).resolve().parents[2] / "labeling_configs"
CAPTION = scheme_from_config((CONFIGS / "region_captioning.xml").read_text())
CLASSIFICATION = scheme_from_config((CONFIGS / "region_classification.xml").read_text())
REGION_QA = scheme_from_config((CONFIGS / "region_qa.xml").read_text())
REASONING = scheme_from_config((CONFIGS / "multi_region_reasoning.xml").read_text())
TASK = {"id": 5, "data": {"image": "/data/upload/1/a.png", "question": "Is <region1> left of <region2>?"}}


def box(region_id, x=10, origin="manual"):
    return {
        "id": region_id,
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": origin,
        "original_width": 800,
        "original_height": 600,
        "value": {"x": x, "y": 10, "width": 20, "height": 20, "rotation": 0, "rectanglelabels": ["Object"]},
    }


def text(region_id, control, value):
    return {
        "id": region_id,
        "from_name": control,
        "to_name": "image",
        "type": "textarea",
        "value": {"text": [value]},
    }


def plan(context, scheme=CAPTION, task=TASK):
    return plan_interactive(task, context, scheme, Prompts(), 32)


def asked(result) -> list[str]:
    return [question.id for question in result.request.questions]


def test_a_caption_is_asked_for_the_newest_hand_drawn_box_and_the_others_are_kept():
    accepted = box("old", origin="prediction")
    result = plan([accepted, text("old", "caption", "a cat"), box("first"), box("new", x=50)])

    assert asked(result) == ["new:caption"]
    # The other boxes go back as they are, or the editor would delete (or empty) them.
    assert [(item["id"], item["from_name"]) for item in result.kept] == [
        ("old", "label"),
        ("old", "caption"),
        ("first", "label"),
    ]
    assert result.waiting is None


def test_a_box_whose_caption_is_typed_already_is_not_overwritten():
    result = plan([box("a"), text("a", "caption", "typed by hand")])

    assert result.request is None
    assert result.waiting == "every box in the call has its answer already"


def test_a_classified_box_is_not_asked_again():
    choice = {
        "id": "a",
        "from_name": "category",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": ["Person"]},
    }

    assert plan([box("a"), choice], CLASSIFICATION).request is None
    assert asked(plan([box("a"), choice, box("b")], CLASSIFICATION)) == ["b:classification"]


def test_region_qa_waits_for_the_typed_question_then_asks_it():
    drawn = plan([box("q1")], REGION_QA)
    typed = plan([box("q1"), text("q1", "question", "What colour is it?")], REGION_QA)

    assert drawn.request is None and "type it into the box and press Enter" in drawn.waiting
    assert asked(typed) == ["q1:region_qa"]
    assert typed.request.questions[0].text == "<region1>: What colour is it?"


def test_region_qa_asks_every_typed_unanswered_box_and_keeps_the_others():
    context = [
        box("done"),
        text("done", "question", "Is it red?"),
        text("done", "answer", "yes"),
        box("asked"),
        text("asked", "question", "Is <region1> moving?"),
        box("untyped"),
    ]

    result = plan(context, REGION_QA)

    assert asked(result) == ["asked:region_qa"]
    assert [(item["id"], item["from_name"]) for item in result.kept] == [
        ("done", "label"),
        ("done", "question"),
        ("done", "answer"),
        ("untyped", "label"),
    ]


def test_reasoning_asks_once_the_boxes_the_question_names_are_drawn():
    one = plan([box("r1")], REASONING)
    two = plan([box("r1"), box("r2", x=50)], REASONING)

    assert one.request is None and one.waiting == "the question names region2: draw 1 more box"
    assert asked(two) == ["task:reasoning"]
    assert [region.id for region in two.regions] == ["r1", "r2"]


def test_a_reasoning_question_answered_already_is_not_asked_again():
    answer = {
        "id": "t",
        "from_name": "answer",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": ["yes"]},
    }

    assert plan([box("r1"), box("r2", x=50), answer], REASONING).waiting == "the question is answered already"


def test_a_call_without_a_box_waits():
    assert plan([text("a", "caption", "x")]).waiting == "no box of 'label' in the call"
