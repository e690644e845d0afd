"""Regions to a describe job: the questions a labeling scheme asks about a task's rectangles.

caption and classification ask the project's prompt about each region; region_qa asks each region the
question the annotator typed into it; reasoning asks the task's question once about the rectangles it names.
The job is a roi_contract DescribeRequest, checked when it is built: what the backend enqueues already fits
the contract the worker reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backend.labeling import LabelingScheme
from backend.regions import Region
from roi_contract.describe import DEFAULT_MAX_NEW_TOKENS, REGION_REFERENCE, DescribeRequest
from roi_contract.project import Prompts
from roi_contract.validation import parse

REASONING_QUESTION_ID = "task:reasoning"


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
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    only_region_id: str | None = None,
) -> DescribeRequest | None:
    """The describe job of DESIGN.md for one task; None when there is nothing to ask.

    caption and classification ask one question per region. region_qa asks each region the question the
    annotator typed into its question TextArea (found in `source_result`); regions without one are
    skipped, and a question that names no <regionK> is sent as "<region1>: <question>". reasoning asks
    the task's question once, where <regionK> is the K-th rectangle in `regions`; the job lists only the
    rectangles the question mentions, in that order, and renumbers the question's tags to match them
    (DESIGN.md: <regionK> is the K-th of the question's regions), so "<region1> or <region3>?" is sent as
    "<region1> or <region2>?" about the first and third rectangles. Only regions that a question refers to
    are sent. `only_region_id` limits a per-region job to that one region.
    """
    image_url = task_image_url(task, scheme)
    if only_region_id is not None:
        if scheme.kind == "reasoning":
            raise ValueError(
                "only_region_id does not apply to the reasoning kind: its question uses every rectangle"
            )
        regions = [region for region in regions if region.id == only_region_id]
        if not regions:
            raise ValueError(f"task {task.get('id')} has no rectangle with id {only_region_id!r}")

    questions = _questions(task, regions, scheme, prompts, source_result)
    if not questions:
        return None
    asked = {region_id for question in questions for region_id in question["regions"]}
    job = {
        "image": {"url": image_url, "task_id": task.get("id")},
        "regions": [{"id": region.id, "box": list(region.box)} for region in regions if region.id in asked],
        "questions": questions,
        "max_new_tokens": max_new_tokens,
    }
    return parse(DescribeRequest, job, f"the describe job of task {task.get('id')}")


def task_image_url(task: Mapping[str, Any], scheme: LabelingScheme) -> str:
    """The task's image URL; ValueError naming the data key when there is none."""
    data = task.get("data")
    url = data.get(scheme.image_key) if isinstance(data, Mapping) else None
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"task {task.get('id')} has no image URL under {scheme.image_key!r} in its data")
    return url.strip()


def region_question(typed: str) -> str:
    """A region_qa question as it is asked: one that names no <regionK> is about the region it was typed into."""
    return typed if REGION_REFERENCE.search(typed) else f"<region1>: {typed}"


def textarea_text(item: Mapping[str, Any] | None) -> str:
    """A TextArea item's text: its lines, stripped and joined by spaces ("" for anything else)."""
    value = (item or {}).get("value")
    lines = value.get("text") if isinstance(value, Mapping) else None
    if isinstance(lines, str):
        lines = [lines]
    if not isinstance(lines, list):
        return ""
    return " ".join(line.strip() for line in lines if isinstance(line, str) and line.strip())


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
            text = region_question(text)
            _check_region_tags(text, 1, f"the question typed for region {region.id!r}")
            asked.append(ask(region, text))
        return asked

    data = task.get("data")
    text = data.get(scheme.question_key) if isinstance(data, Mapping) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"task {task.get('id')} has no question under {scheme.question_key!r} in its data")
    _check_region_tags(text, len(regions), f"the question of task {task.get('id')}")
    # The worker reads a box only where the text names it, so it refuses a listed box that is never mentioned.
    mentioned = sorted({int(k) for k in REGION_REFERENCE.findall(text)})
    asked_number = {task_number: number for number, task_number in enumerate(mentioned, start=1)}
    text = REGION_REFERENCE.sub(lambda tag: f"<region{asked_number[int(tag.group(1))]}>", text)
    return [{"id": REASONING_QUESTION_ID, "text": text, "regions": [regions[k - 1].id for k in mentioned]}]


def _typed_questions(result: Sequence[Mapping[str, Any]], control: str | None) -> dict[str, str]:
    return {str(item.get("id")): textarea_text(item) for item in result if item.get("from_name") == control}


def _check_region_tags(text: str, region_count: int, where: str) -> None:
    for k in sorted({int(k) for k in REGION_REFERENCE.findall(text)}):
        if not 1 <= k <= region_count:
            raise ValueError(f"{where} refers to <region{k}>, but there are only {region_count} rectangles")
