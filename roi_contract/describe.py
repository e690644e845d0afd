"""The describe job (DESIGN.md, "Data contracts"): what the backend asks a worker, and what comes back.

    {"image": {"url": "/data/upload/3/abc.jpg", "task_id": 17},
     "regions": [{"id": "r1", "box": [0.10, 0.20, 0.45, 0.60]}],
     "questions": [{"id": "r1:caption", "text": "Describe <region1> briefly.", "regions": ["r1"]}],
     "max_new_tokens": 48, "project": 3}

A box is [x1, y1, x2, y2] in 0..1 of the displayed image. `<regionK>` in a question's text is the K-th id
of that question's "regions"; every listed region must be mentioned, since the model reads a box only
where its text names it. The result is {"model_version", "answers": [{"id", "text", "score", "truncated"}]}:
one answer per question, in question order; `score` is the mean token log-probability, `truncated` says
that max_new_tokens ended the answer before the model did. `project` (optional) is the Label Studio project
asking: the worker answers with that project's adapter (worker/registry.py), the base when it has none.

Every size is capped here, so a request that passes costs a bounded amount of memory and time wherever it
goes; the backend parses a request before it enqueues it, the worker again when it takes it.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from roi_contract.validation import ContractModel

# `<regionK>`, or GPT4RoI's shorthand `<K>`: the K-th region of the question.
REGION_REFERENCE = re.compile(r"<(?:region)?(\d+)>")
# Label Studio's percentages may overshoot an edge by a rounding error: boxes within this are clipped.
BOX_TOLERANCE = 1e-3
DEFAULT_MAX_NEW_TOKENS = 48
# Far above any caption or answer; keeps one request from holding a GPU for minutes.
MAX_NEW_TOKENS_LIMIT = 1024
MAX_URL_CHARS = 4096  # image URLs are references, never the image itself (data: URLs are refused)
IMAGE_URL_SCHEMES = frozenset({"", "http", "https", "s3", "gs", "azure-blob", "file"})
MAX_ID_CHARS = 200
MAX_QUESTION_CHARS = 2000
MAX_REGIONS = 200
MAX_QUESTIONS = 200


def checked_box(box: list[float]) -> list[float]:
    """A normalized box clipped to the image; ValueError when it lies outside or has no area."""
    if len(box) != 4:
        raise ValueError(f"a box has four numbers x1, y1, x2, y2, got {len(box)}")
    if min(box) < -BOX_TOLERANCE or max(box) > 1 + BOX_TOLERANCE:
        raise ValueError("the box lies outside the image (coordinates are fractions in 0..1)")
    x1, y1, x2, y2 = (min(max(value, 0.0), 1.0) for value in box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError("the box has zero area (need x1 < x2 and y1 < y2)")
    return [x1, y1, x2, y2]


def _image_reference(url: str) -> str:
    """What a worker may fetch: Label Studio paths, http(s), cloud storage URIs, local paths. Data URLs are
    refused here, before a job is stored: an image travels by reference, never inside a job."""
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in url) or "\\" in url:
        raise ValueError("the image URL contains control characters or a backslash")
    scheme = urlsplit(url).scheme.lower() if ":" in url.split("/", 1)[0] else ""
    if scheme not in IMAGE_URL_SCHEMES:
        raise ValueError(
            f"image URLs with scheme {scheme!r} are not fetched (allowed: Label Studio paths, "
            f"{', '.join(sorted(s for s in IMAGE_URL_SCHEMES if s))}, local paths)"
        )
    return url


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("the text is blank")
    return text


Box = Annotated[list[float], Field(min_length=4, max_length=4), AfterValidator(checked_box)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]


class ImageRef(ContractModel):
    url: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_URL_CHARS),
        AfterValidator(_image_reference),
    ]
    task_id: int | None = None


class RegionBox(ContractModel):
    id: Id
    box: Box


class Question(ContractModel):
    id: Id
    text: Annotated[str, StringConstraints(max_length=MAX_QUESTION_CHARS), AfterValidator(_not_blank)]
    regions: Annotated[list[Id], Field(max_length=MAX_REGIONS, default_factory=list)]

    def mentions(self) -> set[int]:
        return {int(number) for number in REGION_REFERENCE.findall(self.text)}


class DescribeRequest(ContractModel):
    image: ImageRef
    regions: Annotated[list[RegionBox], Field(max_length=MAX_REGIONS)]
    questions: Annotated[list[Question], Field(min_length=1, max_length=MAX_QUESTIONS)]
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS_LIMIT)] = DEFAULT_MAX_NEW_TOKENS
    project: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _references_resolve(self) -> DescribeRequest:
        region_ids = [region.id for region in self.regions]
        for ids, what in ((region_ids, "region"), ([q.id for q in self.questions], "question")):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:
                raise ValueError(f"{what} id {twice[0]!r} appears twice")
        for question in self.questions:
            where = f"question {question.id!r}"
            unknown = [rid for rid in question.regions if rid not in region_ids]
            if unknown:
                known = ", ".join(repr(rid) for rid in region_ids) or "none"
                raise ValueError(
                    f"{where} refers to region {unknown[0]!r}, which the request does not have ({known})"
                )
            mentioned = question.mentions()
            for number in sorted(mentioned):
                if not 1 <= number <= len(question.regions):
                    raise ValueError(
                        f"{where} mentions <region{number}>, but lists {len(question.regions)} region(s)"
                    )
            for number, region_id in enumerate(question.regions, start=1):
                if number not in mentioned:
                    raise ValueError(
                        f"{where} lists region {region_id!r} but never mentions it as <region{number}>"
                    )
        return self

    def boxes_of(self, question: Question) -> list[list[float]]:
        """The boxes of the question's regions, in the order <region1>, <region2>, ..."""
        by_id = {region.id: region.box for region in self.regions}
        return [by_id[region_id] for region_id in question.regions]


class Answer(ContractModel):
    id: Id
    text: str
    score: Annotated[
        float, Field(le=1e-3)
    ]  # a mean log-probability; float rounding may leave it a hair above 0
    truncated: bool = False


class DescribeResult(ContractModel):
    model_version: Annotated[str, StringConstraints(min_length=1)]
    answers: list[Answer]
