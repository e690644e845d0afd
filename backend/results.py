"""Label Studio results to regions, regions to a describe job, and the worker's answers back to a prediction.

A `Region` is one rectangle of a Label Studio result, with its box normalized to 0..1 of the displayed
image (DESIGN.md, "Data contracts"). `describe_request` builds the describe job for the worker;
`prediction_from_answers` turns the job's answers into a Label Studio prediction that echoes each
rectangle together with an answer item sharing its id (without the echo, the box loses its label in
the UI: reference/label-studio.md §2.4).
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


def region_from_item(item: Mapping[str, Any]) -> Region:
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
    """The rectangles of the scheme's rectangle control, in result order; other controls' items are skipped."""
    return [region_from_item(item) for item in result if item.get("from_name") == scheme.rectangle]


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
    the task's question once, where <regionK> is the K-th rectangle in `regions`. Only regions that a
    question refers to are sent. `only_region_id` limits a per-region job to that one region.
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
    return [{"id": REASONING_QUESTION_ID, "text": text, "regions": [region.id for region in regions]}]


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
) -> dict:
    """A Label Studio prediction from the worker's answers, validated against the label config.

    Per-region kinds: every answered region gives its echoed rectangle plus an answer item with the same
    id. reasoning: the rectangles plus one task-level TextArea item. Scores: the worker's mean token
    log-probability becomes a probability, exp(score), per item; the prediction's score is their mean
    (0.0 when nothing was answered).
    """
    result: list[dict] = []
    scores: list[float] = []
    for items, score in _answered(scheme, regions, answers_by_id(answers)):
        result += items
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
    scheme: LabelingScheme, regions: Sequence[Region], by_id: Mapping[str, Mapping[str, Any]]
) -> Iterator[tuple[list[dict], float]]:
    """The result items of each answer, with the answer's probability."""
    if scheme.kind == "reasoning":
        answer = by_id.get(REASONING_QUESTION_ID)
        if answer is not None:
            score = _probability(answer)
            task_answer = {
                "id": uuid.uuid4().hex[:10],
                "from_name": scheme.answer,
                "to_name": scheme.interface().get_control(scheme.answer).to_name[0],
                "type": "textarea",
                "value": {"text": [answer["text"]]},
                "score": score,
            }
            yield [*(_echo(region, scheme) for region in regions), task_answer], score
        return

    for region in regions:
        answer = by_id.get(question_id(scheme, region.id))
        if answer is None:
            continue
        content = _answer_value(scheme, answer["text"])
        if content is None:
            logger.info(
                "region %s: %r matches none of the choices %s", region.id, answer["text"], scheme.choices
            )
            continue
        score = _probability(answer)
        # Both items form one region in the UI; the region list shows the score.
        rectangle = {**_echo(region, scheme), "score": score}
        geometry = {key: rectangle["value"][key] for key in _GEOMETRY_KEYS if key in rectangle["value"]}
        region_answer = {
            **{
                key: rectangle[key]
                for key in ("original_width", "original_height", "image_rotation")
                if key in rectangle
            },
            "id": region.id,
            "from_name": scheme.answer,
            "to_name": scheme.image,
            "type": scheme.answer_type,
            "value": {**geometry, **content},
            "score": score,
        }
        yield [rectangle, region_answer], score


def _answer_value(scheme: LabelingScheme, text: str) -> dict | None:
    if scheme.answer_type == "textarea":
        return {"text": [text]}
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
