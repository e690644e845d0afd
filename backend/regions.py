"""Label Studio results to regions: the rectangles of a result, with boxes in the describe contract's terms.

A `Region` is one rectangle of a Label Studio result, with its box normalized to 0..1 of the displayed
image (DESIGN.md, "Data contracts"); `item` keeps the result item itself, which a prediction echoes.
Rotated rectangles become their axis-aligned bounding box. Geometry must be finite numbers: a rectangle
without them raises ValueError naming the rectangle and the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.labeling import LabelingScheme

_GEOMETRY = ("x", "y", "width", "height")


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
    region_id = item.get("id")
    if not isinstance(region_id, str | int) or isinstance(region_id, bool) or not str(region_id):
        raise ValueError(f"a rectangle has no 'id' (got {str(region_id)[:40]!r})")
    where = f"rectangle {str(region_id)[:80]!r}"
    value = item.get("value")
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} has no 'value' object")
    geometry = {key: _finite(value.get(key), f"{where} value.{key}") for key in _GEOMETRY}
    rotation = _finite(value.get("rotation") or 0, f"{where} value.rotation")
    width, height = (_size(item.get(key), f"{where} {key}") for key in ("original_width", "original_height"))
    kind = item.get("type")
    labels = value.get(kind, ()) if isinstance(kind, str) else ()
    return Region(
        id=str(region_id),
        box=_bounding_box(geometry, rotation, width, height),
        labels=tuple(str(label) for label in labels) if isinstance(labels, list) else (),
        original_width=width,
        original_height=height,
        item=item,
        question_item=question_item,
    )


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number, got {str(value)[:40]!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or abs(number) > 1e6:
        raise ValueError(f"{where} must be a finite percentage, got {str(value)[:40]}")
    return number


def _size(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 10**6:
        raise ValueError(f"{where} must be a positive pixel count, got {str(value)[:40]!r}")
    return value


def _bounding_box(
    geometry: Mapping[str, float], rotation: float, width: int | None, height: int | None
) -> tuple[float, float, float, float]:
    """Axis-aligned bounding box of a (possibly rotated) LS rectangle, clipped to the image."""
    if not (width and height):
        # Without the image size the pixel aspect ratio is unknown, so percent space is treated as square.
        # That is exact for unrotated boxes; rotated ones come out approximate.
        width = height = 100
    x, y = geometry["x"] / 100 * width, geometry["y"] / 100 * height
    w, h = geometry["width"] / 100 * width, geometry["height"] / 100 * height
    # LS rotates around the top-left corner, clockwise on screen (y points down), in pixel space.
    theta = math.radians(rotation)
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
    result = [item for item in result if isinstance(item, Mapping)]
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
    annotations = [a for a in _entries(task, "annotations") if not a.get("was_cancelled")]
    for source in (annotations, _entries(task, "drafts"), _entries(task, "predictions")):
        for entry in sorted(source, key=_recency, reverse=True):
            result = entry.get("result")
            if not isinstance(result, list):
                continue
            regions = regions_from_result(result, scheme)
            if regions:
                return regions, result
    return [], []


def _entries(task: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    """The task's annotations, drafts or predictions that are objects (LS sends some as bare ids)."""
    entries = task.get(key)
    return [entry for entry in entries if isinstance(entry, Mapping)] if isinstance(entries, list) else []


def _recency(entry: Mapping[str, Any]) -> tuple[str, int]:
    # LS writes every timestamp in the same ISO 8601 UTC form, so string order is time order.
    stamp = entry.get("updated_at") or entry.get("created_at")
    entry_id = entry.get("id")
    return (
        stamp if isinstance(stamp, str) else "",
        entry_id if isinstance(entry_id, int) and not isinstance(entry_id, bool) else 0,
    )
