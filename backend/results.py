"""Label Studio results to regions, regions to a describe job, and the worker's answers back to a prediction.

A `Region` is one rectangle of a Label Studio result, with its box normalized to 0..1 of the displayed
image (DESIGN.md, "Data contracts"). `describe_request` builds the describe job for the worker;
`prediction_from_answers` turns the job's answers into a Label Studio prediction that echoes each asked
rectangle together with an answer item sharing its id. The echo matters: interactive pre-annotation
replaces the drawn region with the suggestion, so a rectangle left out of it disappears from the UI, and
one echoed without its label turns gray (reference/label-studio.md §2.4). So a rectangle is echoed even
when its answer cannot be used (no choice matches, empty text); only the answer is left out. For the same
reason a region_qa rectangle is echoed with the question the annotator typed into it.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.labeling import LabelingScheme, Prompts

logger = logging.getLogger(__name__)

REASONING_QUESTION_ID = "task:reasoning"

_REGION_TAG = re.compile(r"<region(\d+)>")
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
# Words that say nothing about which choice the model meant.
_FILLER_WORDS = frozenset({"a", "an", "the", "is", "it", "its", "this", "that", "of"})


@dataclass(frozen=True)
class Region:
    id: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in 0..1 of the displayed image
    labels: tuple[str, ...] = ()
    original_width: int | None = None
    original_height: int | None = None
    item: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the LS result item
    # region_qa: the LS result item of the question typed into this region, echoed with the answer.
    question_item: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)


def region_from_item(item: Mapping[str, Any], question_item: Mapping[str, Any] | None = None) -> Region:
    value = item.get("value") or {}
    width, height = item.get("original_width"), item.get("original_height")
    try:
        box = _bounding_box(value, width, height)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"rectangle {item.get('id')!r} has no numeric x/y/width/height: {value!r}") from exc
    return Region(
        id=str(item["id"]),
        box=box,
        labels=tuple(value.get(item.get("type", ""), ())),
        original_width=width,
        original_height=height,
        item=item,
        question_item=question_item,
    )


def _bounding_box(value: Mapping[str, Any], width: int | None, height: int | None) -> tuple[float, ...]:
    """Axis-aligned bounding box of a (possibly rotated) LS rectangle, clipped to the image."""
    if not (width and height):
        # Without the image size the pixel aspect ratio is unknown, so percent space is treated as square.
        # That is exact for unrotated boxes; rotated ones come out approximate.
        width = height = 100
    x, y = float(value["x"]) / 100 * width, float(value["y"]) / 100 * height
    w, h = float(value["width"]) / 100 * width, float(value["height"]) / 100 * height
    # LS rotates around the top-left corner, clockwise on screen (y points down), in pixel space.
    theta = math.radians(float(value.get("rotation") or 0))
    cos, sin = math.cos(theta), math.sin(theta)
    corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    xs = [x + dx * cos - dy * sin for dx, dy in corners]
    ys = [y + dx * sin + dy * cos for dx, dy in corners]
    box = (min(xs) / width, min(ys) / height, max(xs) / width, max(ys) / height)
    # Rounding to 1e-6 of the image (far below a pixel) keeps payloads free of float noise like 0.44999999.
    return tuple(round(min(max(v, 0.0), 1.0), 6) for v in box)


def regions_from_result(result: Iterable[Mapping[str, Any]], scheme: LabelingScheme) -> list[Region]:
    """The rectangles of the scheme's rectangle control, in result order; other controls' items are skipped.

    region_qa: each region carries the question item that shares its id (the last one, if there are several).
    """
    result = list(result)
    question_control = scheme.question if scheme.kind == "region_qa" else None
    questions = {
        str(item.get("id")): item
        for item in result
        if question_control is not None and item.get("from_name") == question_control
    }
    return [
        region_from_item(item, questions.get(str(item.get("id"))))
        for item in result
        if item.get("from_name") == scheme.rectangle
    ]


def drawn_region(context_result: Sequence[Mapping[str, Any]], scheme: LabelingScheme) -> Region:
    """The box the annotator just drew, from an interactive /predict context.

    The context may also hold earlier prediction boxes, and the new box twice under two ids
    (reference/label-studio.md §2.4): take the last manual rectangle, else the last rectangle.
    """
    rectangles = regions_from_result(context_result, scheme)
    if not rectangles:
        raise ValueError(f"the interactive context has no rectangle from control '{scheme.rectangle}'")
    manual = [region for region in rectangles if region.item.get("origin") == "manual"]
    return (manual or rectangles)[-1]


def task_regions(task: Mapping[str, Any], scheme: LabelingScheme) -> tuple[list[Region], list[dict]]:
    """The rectangles already on a task, for batch predict, and the result list they come from.

    Looks at the newest non-cancelled annotation with rectangles, else the newest draft with rectangles,
    else the newest prediction with rectangles. Returns ([], []) when none has any.
    """
    annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    for source in (annotations, task.get("drafts") or [], task.get("predictions") or []):
        for entry in sorted(source, key=_recency, reverse=True):
            result = entry.get("result") or []
            regions = regions_from_result(result, scheme)
            if regions:
                return regions, result
    return [], []


def _recency(entry: Mapping[str, Any]) -> tuple[str, int]:
    # LS writes every timestamp in the same ISO 8601 UTC form, so string order is time order.
    return (entry.get("updated_at") or entry.get("created_at") or "", entry.get("id") or 0)


def question_id(scheme: LabelingScheme, region_id: str) -> str:
    """Id of the per-region question about `region_id` (the reasoning kind uses REASONING_QUESTION_ID)."""
    return f"{region_id}:{scheme.kind}"


def describe_request(
    task: Mapping[str, Any],
    regions: Sequence[Region],
    scheme: LabelingScheme,
    prompts: Prompts,
    *,
    source_result: Sequence[Mapping[str, Any]] | None = None,
    max_new_tokens: int = 48,
    only_region_id: str | None = None,
) -> dict:
    """The describe job of DESIGN.md for one task.

    caption and classification ask one question per region. region_qa asks each region the question the
    annotator typed into its question TextArea (found in `source_result`); regions without one are
    skipped, and a question that names no <regionK> is sent as "<region1>: <question>". reasoning asks
    the task's question once, where <regionK> is the K-th rectangle in `regions`; the job lists only the
    rectangles the question mentions, in that order, and renumbers the question's tags to match them
    (DESIGN.md: <regionK> is the K-th of the question's regions), so "<region1> or <region3>?" is sent as
    "<region1> or <region2>?" about the first and third rectangles. Only regions that a question refers to
    are sent. `only_region_id` limits a per-region job to that one region.
    """
    image_url = (task.get("data") or {}).get(scheme.image_key)
    if not image_url:
        raise ValueError(f"task {task.get('id')} has no {scheme.image_key!r} in its data")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if only_region_id is not None:
        if scheme.kind == "reasoning":
            raise ValueError(
                "only_region_id does not apply to the reasoning kind: its question uses every rectangle"
            )
        regions = [region for region in regions if region.id == only_region_id]
        if not regions:
            raise ValueError(f"task {task.get('id')} has no rectangle with id {only_region_id!r}")

    questions = _questions(task, regions, scheme, prompts, source_result)
    asked = {region_id for question in questions for region_id in question["regions"]}
    return {
        "image": {"url": image_url, "task_id": task.get("id")},
        "regions": [{"id": region.id, "box": list(region.box)} for region in regions if region.id in asked],
        "questions": questions,
        "max_new_tokens": max_new_tokens,
    }


def _questions(
    task: Mapping[str, Any],
    regions: Sequence[Region],
    scheme: LabelingScheme,
    prompts: Prompts,
    source_result: Sequence[Mapping[str, Any]] | None,
) -> list[dict]:
    def ask(region: Region, text: str) -> dict:
        return {"id": question_id(scheme, region.id), "text": text, "regions": [region.id]}

    if scheme.kind == "caption":
        return [ask(region, prompts.caption) for region in regions]
    if scheme.kind == "classification":
        return [ask(region, prompts.classification_text(scheme.choices)) for region in regions]
    if scheme.kind == "region_qa":
        if source_result is None:
            raise ValueError("region_qa needs source_result: the result holding the typed questions")
        typed = _typed_questions(source_result, scheme.question)
        asked = []
        for region in regions:
            text = typed.get(region.id, "")
            if not text:
                continue
            if not _REGION_TAG.search(text):
                text = f"<region1>: {text}"
            _check_region_tags(text, 1, f"the question typed for region {region.id!r}")
            asked.append(ask(region, text))
        return asked

    text = (task.get("data") or {}).get(scheme.question_key)
    if not text:
        raise ValueError(f"task {task.get('id')} has no {scheme.question_key!r} in its data")
    _check_region_tags(text, len(regions), f"the question of task {task.get('id')}")
    # The worker reads a box only where the text names it, so it refuses a listed box that is never mentioned.
    mentioned = sorted({int(k) for k in _REGION_TAG.findall(text)})
    asked_number = {task_number: number for number, task_number in enumerate(mentioned, start=1)}
    text = _REGION_TAG.sub(lambda tag: f"<region{asked_number[int(tag.group(1))]}>", text)
    return [{"id": REASONING_QUESTION_ID, "text": text, "regions": [regions[k - 1].id for k in mentioned]}]


def _typed_questions(result: Sequence[Mapping[str, Any]], control: str | None) -> dict[str, str]:
    typed = {}
    for item in result:
        if item.get("from_name") == control:
            lines = (item.get("value") or {}).get("text") or []
            typed[str(item.get("id"))] = " ".join(line.strip() for line in lines if line.strip())
    return typed


def _check_region_tags(text: str, region_count: int, where: str) -> None:
    for k in sorted({int(k) for k in _REGION_TAG.findall(text)}):
        if not 1 <= k <= region_count:
            raise ValueError(f"{where} refers to <region{k}>, but there are only {region_count} rectangles")


def answers_by_id(answers: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The worker's answers keyed by question id, each checked to have an id, a text and a score."""
    joined = {}
    for index, answer in enumerate(answers):
        if not isinstance(answer.get("id"), str) or not isinstance(answer.get("text"), str):
            raise ValueError(f"answer {index} needs a string 'id' and 'text', got {answer!r}")
        if not isinstance(answer.get("score"), int | float):
            raise ValueError(f"answer {answer['id']!r} needs a numeric 'score' (mean token log-probability)")
        joined[answer["id"]] = answer
    return joined


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
    answers: Iterable[Mapping[str, Any]],
    model_version: str,
    *,
    request: Mapping[str, Any] | None = None,
) -> dict:
    """A Label Studio prediction from the worker's answers, validated against the label config.

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
    for items, score in _answered(scheme, regions, answers_by_id(answers), request):
        result += items
        if score is not None:
            scores.append(score)

    prediction = {
        "result": result,
        "score": sum(scores) / len(scores) if scores else 0.0,
        "model_version": model_version,
    }
    errors = scheme.interface().validate_prediction(prediction, return_errors=True)
    if errors:
        raise ValueError("the prediction does not fit the label config: " + "; ".join(errors))
    return prediction


def _answered(
    scheme: LabelingScheme,
    regions: Sequence[Region],
    by_id: Mapping[str, Mapping[str, Any]],
    request: Mapping[str, Any] | None,
) -> Iterator[tuple[list[dict], float | None]]:
    """The result items of each answer, with the answer's probability (None when the answer is not used)."""
    if scheme.kind == "reasoning":
        answer = by_id.get(REASONING_QUESTION_ID)
        if answer is None:
            return
        score = _probability(answer)
        rectangles = [_echo(region, scheme) for region in regions]
        text = _in_task_numbering(answer["text"], regions, request)
        if not text.strip():
            logger.info("task-level answer is empty; the rectangles are echoed without it")
            yield rectangles, None
            return
        task_answer = {
            "id": uuid.uuid4().hex[:10],
            "from_name": scheme.answer,
            "to_name": scheme.interface().get_control(scheme.answer).to_name[0],
            "type": "textarea",
            "value": {"text": [text]},
            "score": score,
        }
        yield [*rectangles, task_answer], score
        return

    for region in regions:
        answer = by_id.get(question_id(scheme, region.id))
        if answer is None:
            continue
        score = _probability(answer)
        rectangle = _echo(region, scheme)
        # The typed question goes back with the box: the accepted suggestion replaces the region's items.
        question = _typed_question_item(region, rectangle, scheme)
        content = _answer_value(scheme, answer["text"])
        if content is None:
            why = f"matches none of the choices {list(scheme.choices)}" if scheme.choices else "is empty"
            logger.info(
                "region %s: the answer %r %s; the box is echoed without it", region.id, answer["text"], why
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


def _in_task_numbering(text: str, regions: Sequence[Region], request: Mapping[str, Any] | None) -> str:
    """A reasoning answer's region references, renumbered from the describe job's question to the task's."""
    if request is None:
        return text
    questions = {question.get("id"): question for question in request.get("questions") or []}
    asked = (questions.get(REASONING_QUESTION_ID) or {}).get("regions") or []
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


def _answer_value(scheme: LabelingScheme, text: str) -> dict | None:
    """The answer item's value content; None when the answer cannot be used."""
    if scheme.answer_type == "textarea":
        return {"text": [text]} if text.strip() else None
    choice = closest_choice(text, scheme.choices)
    return {"choices": [choice]} if choice is not None else None


def _probability(answer: Mapping[str, Any]) -> float:
    log_probability = float(answer["score"])
    # A mean log-probability is <= 0; float rounding in log_softmax can leave it a hair above.
    if log_probability > 1e-3:
        raise ValueError(
            f"answer {answer['id']!r} has score {log_probability}; expected a mean token log-probability (<= 0)"
        )
    return math.exp(min(log_probability, 0.0))


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
