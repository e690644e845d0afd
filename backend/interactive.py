"""Interactive pre-annotation: what the labeling UI asks while an annotator works on smart-tool boxes.

How Label Studio 1.23.2's editor behaves decides the flows (read in its bundle,
web/dist/apps/labelstudio/358.js and main.js):

* It calls the backend on a region's `regionFinishedDrawing`, which a smart-tool box fires when it is
  drawn, moved or resized, and when a per-region TextArea of it changes (the annotator types and presses
  Enter: TextArea's onChange calls the region's notifyDrawingFinished). The context holds the result items
  of that box and of every other box of the same type and label on the image, with their per-region texts.
* The reply's `result` becomes suggestions. With auto-accept on, each suggestion replaces the box of its
  id, and every box still "dynamic" (drawn with the smart tool, never answered) that the reply leaves out is
  deleted; a box made from a suggestion fires no more calls. A reply without `result` changes nothing.

Hence, per kind:

* caption, classification: answer the newest hand-drawn box that has no answer yet.
* region_qa: draw the box, type the question into it, press Enter: every hand-drawn box whose question is
  typed and whose answer is empty is asked. A box without a question yet is left alone (no result): it
  stays dynamic, so its Enter asks it.
* reasoning: the question is the task's (`<Text value="$question">`); it is asked as soon as the boxes it
  names are drawn (in the order it names them), and the answer fills the task-level TextArea.

Whatever fails, the boxes stay: the reply echoes them with the reason in the answer field (backend/
predictions.py failure_prediction), or, where the answer is not text, carries no result at all. Other
boxes of the call that are not asked are echoed as they are, so the editor neither deletes nor empties them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.describe_jobs import describe_request, textarea_text
from backend.labeling import LabelingScheme
from backend.regions import Region, regions_from_result
from roi_contract.describe import REGION_REFERENCE, DescribeRequest
from roi_contract.project import Prompts


@dataclass(frozen=True)
class InteractivePlan:
    task_id: Any
    regions: Sequence[Region] = ()  # the boxes asked about (reasoning: every box, in drawing order)
    request: DescribeRequest | None = None
    # The call's items of every box not asked about (rectangle and per-region texts), echoed as they are: the
    # editor replaces a box by its echo, and deletes a smart-drawn box that a reply leaves out.
    kept: Sequence[Mapping[str, Any]] = ()
    waiting: str | None = None  # why nothing is asked yet: the reply then carries no result


def plan_interactive(
    task: Mapping[str, Any],
    context: Sequence[Mapping[str, Any]],
    scheme: LabelingScheme,
    prompts: Prompts,
    max_new_tokens: int,
) -> InteractivePlan:
    """What to ask about the boxes of an interactive call; ValueError names a malformed task or box."""
    task_id = task.get("id")
    rectangles = regions_from_result(context, scheme)
    if not rectangles:
        return InteractivePlan(task_id, waiting=f"no box of '{scheme.rectangle}' in the call")
    answered = _answered_ids(context, scheme)

    def ask(regions: Sequence[Region]) -> InteractivePlan:
        request = describe_request(
            task, regions, scheme, prompts, source_result=context, max_new_tokens=max_new_tokens
        )
        if request is None:
            return InteractivePlan(task_id, waiting="nothing to ask yet")
        asked = {region.id for region in regions}
        kept = [item for item in context if str(item.get("id")) not in asked and _on_a_box(item, rectangles)]
        return InteractivePlan(task_id, regions, request, kept)

    if scheme.kind == "reasoning":
        return _plan_reasoning(task, rectangles, answered, scheme) or ask(rectangles)
    open_boxes = [r for r in rectangles if r.item.get("origin") == "manual" and r.id not in answered]
    if scheme.kind == "region_qa":
        typed = {r.id for r in open_boxes if r.question_item is not None and textarea_text(r.question_item)}
        if not typed:
            return InteractivePlan(
                task_id, waiting="no box has a typed question yet: type it into the box and press Enter"
            )
        return ask([r for r in open_boxes if r.id in typed])
    if not open_boxes:
        return InteractivePlan(task_id, waiting="every box in the call has its answer already")
    return ask(open_boxes[-1:])


def _on_a_box(item: Mapping[str, Any], rectangles: Sequence[Region]) -> bool:
    return any(str(item.get("id")) == region.id for region in rectangles)


def _plan_reasoning(
    task: Mapping[str, Any], rectangles: Sequence[Region], answered: set[str], scheme: LabelingScheme
) -> InteractivePlan | None:
    """The waiting plan while the task's question cannot be asked yet; None once it can."""
    if answered:
        return InteractivePlan(task.get("id"), waiting="the question is answered already")
    data = task.get("data")
    question = data.get(scheme.question_key) if isinstance(data, Mapping) else None
    named = max((int(k) for k in REGION_REFERENCE.findall(question or "")), default=0)
    if named > len(rectangles):
        more = named - len(rectangles)
        return InteractivePlan(
            task.get("id"),
            waiting=f"the question names region{named}: draw {more} more box{'es' if more > 1 else ''}",
        )
    return None


def _answered_ids(context: Sequence[Mapping[str, Any]], scheme: LabelingScheme) -> set[str]:
    """Ids of the context's regions (reasoning: "task") whose answer control holds something already."""
    answered = set()
    for item in context:
        if item.get("from_name") != scheme.answer:
            continue
        value = item.get("value")
        choices = value.get("choices") if isinstance(value, Mapping) else None
        if textarea_text(item) or choices:
            answered.add("task" if scheme.kind == "reasoning" else str(item.get("id")))
    return answered
