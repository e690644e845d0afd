"""The describe job's request (DESIGN.md, "Data contracts"), checked in full before any work is done.

A request arrives as JSON from the backend, built from Label Studio data that annotators control, so every
field is checked and every problem raises ValueError naming the field, the region or the question. Such a
request fails the same way on every attempt: the worker fails it at once instead of retrying it.

    {"image": {"url": "/data/upload/3/abc.jpg", "task_id": 17},
     "regions": [{"id": "r1", "box": [0.10, 0.20, 0.45, 0.60]}],
     "questions": [{"id": "r1:caption", "text": "Describe <region1> briefly.", "regions": ["r1"]}],
     "max_new_tokens": 48}

`<regionK>` in a question's text is the K-th id of that question's "regions"; every listed region must be
mentioned, since the model reads a box only where its text names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from roi_model.engine import ImageRequest, RegionQuery
from roi_model.generation import Answer, GenerationOptions
from roi_model.processing import BOX_TOLERANCE
from roi_model.prompts import REGION_REFERENCE

# Far above any caption or answer; keeps one request from holding a GPU for minutes.
MAX_NEW_TOKENS_LIMIT = 1024

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    boxes: tuple[Box, ...]  # the boxes of the question's regions, in the order <region1>, <region2>, ...


@dataclass(frozen=True)
class DescribeRequest:
    image_url: str
    task_id: int | None
    questions: tuple[Question, ...]
    max_new_tokens: int

    def image_request(self, image: Image.Image) -> ImageRequest:
        """The engine's request for the decoded image."""
        return ImageRequest(
            image,
            [RegionQuery(question.text, list(question.boxes)) for question in self.questions],
            GenerationOptions(max_new_tokens=self.max_new_tokens),
        )

    def answers_json(self, answers: Sequence[Answer]) -> list[dict]:
        """The engine's answers as the job result's "answers": one per question, in question order."""
        return [
            {"id": question.id, "text": answer.text, "score": answer.score}
            for question, answer in zip(self.questions, answers, strict=True)
        ]


def parse_describe_request(request: Any, *, default_max_new_tokens: int) -> DescribeRequest:
    """Check a describe request and resolve each question's regions to boxes; ValueError names any problem."""
    if not isinstance(request, Mapping):
        raise ValueError(f"a describe request must be a JSON object, got {_type(request)}")
    image_url, task_id = _image(request)
    boxes = _regions(_required_list(request, "regions"))
    questions = tuple(_questions(_required_list(request, "questions"), boxes))
    return DescribeRequest(image_url, task_id, questions, _max_new_tokens(request, default_max_new_tokens))


def _image(request: Mapping[str, Any]) -> tuple[str, int | None]:
    image = request.get("image")
    if not isinstance(image, Mapping):
        raise ValueError(f'"image" must be an object with a "url", got {_type(image)}')
    url = image.get("url")
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f'"image" needs a non-empty "url" string, got {url!r}')
    task_id = image.get("task_id")
    if task_id is not None and not _is_int(task_id):
        raise ValueError(f'"image" "task_id" must be an integer or null, got {task_id!r}')
    return url.strip(), task_id


def _required_list(request: Mapping[str, Any], key: str) -> list:
    if key not in request:
        raise ValueError(f'the describe request has no "{key}" list')
    value = request[key]
    if not isinstance(value, list):
        raise ValueError(f'"{key}" must be a list, got {_type(value)}')
    return value


def _regions(regions: list) -> dict[str, Box]:
    boxes: dict[str, Box] = {}
    for index, region in enumerate(regions):
        if not isinstance(region, Mapping):
            raise ValueError(f"region {index} must be an object with an id and a box, got {_type(region)}")
        region_id = _id(region, f"region {index}")
        if region_id in boxes:
            raise ValueError(f"region id {region_id!r} appears twice")
        boxes[region_id] = _box(region.get("box"), f"region {region_id!r}")
    return boxes


def _box(box: Any, where: str) -> Box:
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(value) for value in box):
        raise ValueError(f"{where}: box must be four numbers [x1, y1, x2, y2] in 0..1, got {box!r}")
    if not all(math.isfinite(value) for value in box):
        raise ValueError(f"{where}: box {box} has a coordinate that is not a finite number")
    if min(box) < -BOX_TOLERANCE or max(box) > 1 + BOX_TOLERANCE:
        raise ValueError(f"{where}: box {box} lies outside the image (coordinates are fractions in 0..1)")
    x1, y1, x2, y2 = (min(max(float(value), 0.0), 1.0) for value in box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{where}: box {box} has zero area (need x1 < x2 and y1 < y2)")
    return x1, y1, x2, y2


def _questions(questions: list, boxes: Mapping[str, Box]) -> list[Question]:
    if not questions:
        raise ValueError('"questions" is empty: there is nothing to ask')
    parsed: list[Question] = []
    for index, question in enumerate(questions):
        if not isinstance(question, Mapping):
            raise ValueError(f"question {index} must be an object, got {_type(question)}")
        question_id = _id(question, f"question {index}")
        if any(earlier.id == question_id for earlier in parsed):
            raise ValueError(f"question id {question_id!r} appears twice")
        where = f"question {question_id!r}"
        text = question.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f'{where} needs a non-empty "text", got {text!r}')
        region_ids = question.get("regions", [])
        if not isinstance(region_ids, list) or not all(isinstance(rid, str) for rid in region_ids):
            raise ValueError(f'{where}: "regions" must be a list of region ids, got {region_ids!r}')
        unknown = [rid for rid in region_ids if rid not in boxes]
        if unknown:
            known = ", ".join(repr(rid) for rid in boxes) or "none"
            raise ValueError(
                f"{where} refers to region {unknown[0]!r}, which the request does not have (it has {known})"
            )
        _check_mentions(text, region_ids, where)
        parsed.append(Question(question_id, text, tuple(boxes[rid] for rid in region_ids)))
    return parsed


def _check_mentions(text: str, region_ids: list[str], where: str) -> None:
    mentioned = {int(number) for number in REGION_REFERENCE.findall(text)}
    for number in sorted(mentioned):
        if not 1 <= number <= len(region_ids):
            raise ValueError(
                f'{where} mentions <region{number}>, but lists {len(region_ids)} region(s) in "regions"'
            )
    for number, region_id in enumerate(region_ids, start=1):
        if number not in mentioned:
            raise ValueError(f"{where} lists region {region_id!r} but never mentions it as <region{number}>")


def _max_new_tokens(request: Mapping[str, Any], default: int) -> int:
    value = request.get("max_new_tokens", default)
    if not _is_int(value) or not 1 <= value <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(
            f'"max_new_tokens" must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, got {value!r}'
        )
    return value


def _id(item: Mapping[str, Any], where: str) -> str:
    value = item.get("id")
    if not isinstance(value, str) or not value:
        raise ValueError(f'{where} needs a non-empty string "id", got {value!r}')
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__
