"""The worker's answers back to a Label Studio prediction.

`prediction_from_answers` echoes each asked rectangle together with an answer item sharing its id. The
echo matters: interactive pre-annotation replaces the drawn region with the suggestion, so a rectangle left
out of it disappears from the UI, and one echoed without its label turns gray (reference/label-studio.md
§2.4). So a rectangle is echoed even when its answer cannot be used (no choice matches, empty text); only
the answer is left out. For the same reason a region_qa rectangle is echoed with the question the
annotator typed into it.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from backend.describe_jobs import REASONING_QUESTION_ID, question_id
from backend.labeling import LabelingScheme
from backend.regions import Region
from roi_contract.describe import Answer, DescribeRequest, DescribeResult

logger = logging.getLogger(__name__)

# A model's answer may name a region by its tag or, as in "region2", without the angle brackets.
_REGION_NAME = re.compile(r"\bregion(\d+)\b")
# Keys of a result item that make up the region itself; "origin", "score" and the like are not echoed.
_ECHOED_KEYS = (
    "id",
    "from_name",
    "to_name",
    "type",
    "value",
    "original_width",
    "original_height",
    "image_rotation",
)
_GEOMETRY_KEYS = ("x", "y", "width", "height", "rotation")
# Starts the answer field of a box the model could not answer, with the reason: seen where the annotator
# looks, never trained on (backend/export.py drops such texts).
FAILED_MARK = "[no answer:"
# Ends an answer that max_new_tokens cut off, so nobody accepts a cut sentence unknowingly.
TRUNCATED_MARK = "[…cut off at the answer length limit]"
# Words that say nothing about which choice the model meant.
_FILLER_WORDS = frozenset({"a", "an", "the", "is", "it", "its", "this", "that", "of"})


def closest_choice(text: str, choices: Sequence[str]) -> str | None:
    """The allowed choice the model's text means, or None when no choice shares a word with it.

    An exact case-insensitive match wins; otherwise the choice sharing the most words (filler words such
    as "a", "the", "is" do not count); ties go to the earlier choice.
    """
    wanted = _normalized(text)
    for choice in choices:
        if _normalized(choice) == wanted:
            return choice
    words = _content_words(text)
    best, best_overlap = None, 0
    for choice in choices:
        overlap = len(words & _content_words(choice))
        if overlap > best_overlap:
            best, best_overlap = choice, overlap
    return best


def _normalized(text: str) -> str:
    return text.strip().strip(".!?,;:'\"").strip().casefold()


def _content_words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.casefold())) - _FILLER_WORDS


def prediction_from_answers(
    scheme: LabelingScheme,
    regions: Sequence[Region],
    answered: DescribeResult,
    *,
    request: DescribeRequest | None = None,
    kept: Sequence[Mapping[str, Any]] = (),
) -> dict:
    """A Label Studio prediction from the worker's answers, validated against the label config.

    `kept`: result items echoed as they are (the other boxes of an interactive call, backend/interactive.py).

    Per-region kinds: every answered region gives its echoed rectangle (region_qa: and its typed question)
    plus an answer item with the same id; when the answer cannot be used (no choice matches, empty text),
    the rectangle is echoed without it. reasoning: the rectangles plus one task-level TextArea item, whose
    region references are put back into the task's numbering (<regionK>: the K-th of `regions`) using
    `request`, the describe job the answers are for; without it the answer is taken as numbered that way
    already. Scores: the worker's mean token log-probability becomes a probability, exp(score), per item;
    the prediction's score is their mean over the answers used (0.0 when none was).
    """
    result: list[dict] = []
    scores: list[float] = []
    by_id = {answer.id: answer for answer in answered.answers}
    for items, score in _answered(scheme, regions, by_id, request):
        result += items
        if score is not None:
            scores.append(score)
    result += _kept_items(scheme, kept)

    prediction = {
        "result": result,
        "score": sum(scores) / len(scores) if scores else 0.0,
        "model_version": answered.model_version,
    }
    return _checked(scheme, prediction)


def failure_prediction(
    scheme: LabelingScheme, regions: Sequence[Region], reason: str, *, kept: Sequence[Mapping[str, Any]] = ()
) -> dict | None:
    """An interactive reply that keeps the boxes and says in the answer field why there is no answer.

    None when the answer is not text (Choices cannot say why): the caller then replies without a result,
    which leaves the boxes as they are.
    """
    if scheme.answer_type != "textarea":
        return None
    text = f"{FAILED_MARK} {reason[:300]}]"
    result: list[dict] = []
    if scheme.kind == "reasoning":
        result += [_echo(region, scheme) for region in regions]
        result.append(_task_answer(scheme, text, None))
    else:
        for region in regions:
            rectangle = _echo(region, scheme)
            result += [rectangle, *_typed_question_item(region, rectangle, scheme)]
            result.append(_region_item(rectangle, scheme, scheme.answer, "textarea", {"text": [text]}))
    result += _kept_items(scheme, kept)
    return _checked(scheme, {"result": result, "score": 0.0, "model_version": "none"})


def _kept_items(scheme: LabelingScheme, kept: Sequence[Mapping[str, Any]]) -> list[dict]:
    return [{key: item[key] for key in _ECHOED_KEYS if key in item} for item in kept]


def _checked(scheme: LabelingScheme, prediction: dict) -> dict:
    errors = scheme.interface.validate_prediction(prediction, return_errors=True)
    if errors:
        raise ValueError("the prediction does not fit the label config: " + "; ".join(errors))
    return prediction


def _answered(
    scheme: LabelingScheme,
    regions: Sequence[Region],
    by_id: Mapping[str, Answer],
    request: DescribeRequest | None,
) -> Iterator[tuple[list[dict], float | None]]:
    """The result items of each answer, with the answer's probability (None when the answer is not used)."""
    if scheme.kind == "reasoning":
        answer = by_id.get(REASONING_QUESTION_ID)
        if answer is None:
            return
        score = _probability(answer)
        rectangles = [_echo(region, scheme) for region in regions]
        text = _in_task_numbering(answer.text, regions, request)
        if not text.strip():
            logger.info("task-level answer is empty; the rectangles are echoed without it")
            yield rectangles, None
            return
        yield [*rectangles, _task_answer(scheme, _shown(text, answer), score)], score
        return

    for region in regions:
        answer = by_id.get(question_id(scheme, region.id))
        if answer is None:
            continue
        score = _probability(answer)
        rectangle = _echo(region, scheme)
        # The typed question goes back with the box: the accepted suggestion replaces the region's items.
        question = _typed_question_item(region, rectangle, scheme)
        content = _answer_value(scheme, answer.text, answer)
        if content is None:
            why = f"matches none of the choices {list(scheme.choices)}" if scheme.choices else "is empty"
            logger.info(
                "region %s: the answer %r %s; the box is echoed without it", region.id, answer.text, why
            )
            yield [rectangle, *question], None
            continue
        # Both items form one region in the UI; the region list shows the score.
        rectangle["score"] = score
        region_answer = {
            **_region_item(rectangle, scheme, scheme.answer, scheme.answer_type, content),
            "score": score,
        }
        yield [rectangle, *question, region_answer], score


def _task_answer(scheme: LabelingScheme, text: str, score: float | None) -> dict:
    item = {
        "id": uuid.uuid4().hex[:10],
        "from_name": scheme.answer,
        "to_name": scheme.interface.get_control(scheme.answer).to_name[0],
        "type": "textarea",
        "value": {"text": [text]},
    }
    return item if score is None else {**item, "score": score}


def _region_item(
    rectangle: Mapping[str, Any],
    scheme: LabelingScheme,
    from_name: str,
    kind: str,
    content: Mapping[str, Any],
) -> dict:
    """A per-region item tied to `rectangle`: its id, image size and geometry, plus `content`.

    The full form, geometry included, is what the labeling UI itself writes (reference/label-studio.md §2.7).
    """
    geometry = {key: rectangle["value"][key] for key in _GEOMETRY_KEYS if key in rectangle["value"]}
    return {
        **{
            key: rectangle[key]
            for key in ("original_width", "original_height", "image_rotation")
            if key in rectangle
        },
        "id": rectangle["id"],
        "from_name": from_name,
        "to_name": scheme.image,
        "type": kind,
        "value": {**geometry, **content},
    }


def _typed_question_item(region: Region, rectangle: Mapping[str, Any], scheme: LabelingScheme) -> list[dict]:
    """region_qa: the question typed into the region, as an item to echo ([] when there is none)."""
    if scheme.question is None or region.question_item is None:
        return []
    lines = (region.question_item.get("value") or {}).get("text")
    if not isinstance(lines, list) or not lines:
        return []
    return [_region_item(rectangle, scheme, scheme.question, "textarea", {"text": list(lines)})]


def _in_task_numbering(text: str, regions: Sequence[Region], request: DescribeRequest | None) -> str:
    """A reasoning answer's region references, renumbered from the describe job's question to the task's."""
    if request is None:
        return text
    asked = next((q.regions for q in request.questions if q.id == REASONING_QUESTION_ID), [])
    task_number: dict[str, int] = {}
    for number, region in enumerate(regions, start=1):
        task_number.setdefault(region.id, number)
    unknown = [region_id for region_id in asked if region_id not in task_number]
    if unknown:
        raise ValueError(
            f"the describe job asked about region {unknown[0]!r}, which is not among the rectangles"
        )
    renumbered = {number: task_number[region_id] for number, region_id in enumerate(asked, start=1)}
    return _REGION_NAME.sub(
        lambda name: f"region{renumbered.get(int(name.group(1)), int(name.group(1)))}", text
    )


def _shown(text: str, answer: Answer) -> str:
    """The text as the annotator sees it: an answer the token limit cut off says so at its end."""
    return f"{text} {TRUNCATED_MARK}" if answer.truncated else text


def _answer_value(scheme: LabelingScheme, text: str, answer: Answer) -> dict | None:
    """The answer item's value content; None when the answer cannot be used."""
    if scheme.answer_type == "textarea":
        return {"text": [_shown(text, answer)]} if text.strip() else None
    choice = closest_choice(text, scheme.choices)
    return {"choices": [choice]} if choice is not None else None


def _probability(answer: Answer) -> float:
    # A mean log-probability is <= 0 (the contract allows float rounding a hair above).
    return math.exp(min(answer.score, 0.0))


def _echo(region: Region, scheme: LabelingScheme) -> dict:
    item = region.item
    missing = [key for key in ("id", "from_name", "to_name", "type", "value") if key not in item]
    if missing:
        raise ValueError(f"region {region.id!r} has no LS result item to echo (missing {missing})")
    echoed = {key: item[key] for key in _ECHOED_KEYS if key in item}
    echoed["value"] = dict(item["value"])
    if (
        scheme.rectangle_type == "rectanglelabels"
        and not echoed["value"].get("rectanglelabels")
        and scheme.default_label
    ):
        # An unlabeled box would show up gray and unlabeled once the suggestion is accepted.
        echoed["value"]["rectanglelabels"] = [scheme.default_label]
    return echoed
