"""Curated Label Studio annotations to spatial-instruction training records (DESIGN.md, "Training records").

`convert_tasks`: Label Studio's full JSON export of a project (a list of task dicts; JSON_MIN, which
loses the box-text link, is refused by name) plus the already fetched images become records and a report. No I/O here:
backend/dataset.py fetches the export and the images and writes the dataset folder; backend/export_cli.py
is ``roi-model export``.

The rules:

* Cancelled (skipped) annotations, empty ones and ones without a rectangle are left out; drafts are not
  annotations and are never read. When a task has a ground-truth annotation, the newest one wins and the
  others are left out; otherwise every annotation is its own record.
* A rectangle joins its per-region TextArea or Choices items on the region id. caption and classification
  ask the project's prompt (roi_contract.project.Prompts), region_qa the question the annotator typed, reasoning
  the task's question from its data, where ``<regionK>`` is the K-th rectangle in result order. Regions
  without an answer are left out; the others are numbered in result order: ``<regionK>`` is
  ``regions[K-1]``.
* Regions are the items of the scheme's rectangle control on the scheme's image (its ``to_name``: a box
  drawn on a second image is never one of the first's), and polygons and brush masks on that image (any
  control): these become their bounding box, with the shape kept in the record's "masks" (pixel points of a
  polygon; a brush's LS RLE and its size). Every other region item (a keypoint, an ellipse, a rectangle of a
  second control, anything on another image) is counted under its reason and never exported.
* Boxes are LS percentages of the displayed image, so they become pixels with the size of the image as
  fetched (after EXIF orientation); LS's original_width/height may be stale. Rotated rectangles become their
  axis-aligned bounding box; that needs the true aspect ratio, so a rotated one on an image whose fetched
  aspect ratio disagrees with LS's original_width/height is left out ("rotated_box_aspect_mismatch").
* Provenance: every answer turn's "source" holds its region's: the region id, the origin LS keeps on the
  answer item (else on the rectangle; "unknown" without either) and, for "prediction-changed", the
  suggestion the annotator changed. The record's "source" holds the annotation's: project, task,
  annotation, updated_at, annotator, ground_truth, region_ids (LS ids of `regions`), model_version of the
  prediction it came from, and origin and suggestion: the answers' common origin (else "mixed") and, for a
  one-answer record, its suggestion. The prediction an annotation came from is its parent_prediction (in
  the task's predictions, or as the prediction LS records on each annotation; LS 1.23 exports a task's
  predictions as ids, so export_project fetches a missing one), else, when some item came from a
  prediction, the prediction LS recorded as viewed. Interactive suggestions are never stored as
  predictions, so theirs is null.

The report accounts for every annotation and every region item: exported, or listed under the reason it was
not (a region of a skipped annotation is listed under "annotation_<reason>"). Annotations are listed by id;
an id that two tasks share (LS's own fixtures do this) is listed as "<task>/<annotation>", and so are the
region references of such an annotation. Its by_origin counts the
exported answers by origin: accepted unchanged ("prediction"), edited ("prediction-changed"), "manual".
Records are ordered by task id and annotation id and written with sorted keys, and images are named by
content hash, so the same export gives byte-identical files; only manifest.json's time differs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from backend.describe_jobs import region_question, textarea_text
from backend.export_images import StoredImage
from backend.labeling import LabelingScheme
from backend.predictions import FAILED_MARK, TRUNCATED_MARK
from backend.regions import region_from_item
from roi_contract.describe import REGION_REFERENCE
from roi_contract.project import Prompts
from roi_contract.records import TrainingRecord
from roi_contract.validation import parse

log = logging.getLogger(__name__)

ORIGINS = ("prediction", "prediction-changed", "manual")
UNKNOWN_ORIGIN = "unknown"
MIXED_ORIGIN = "mixed"

_RECTANGLE_TYPES = ("rectangle", "rectanglelabels")
_POLYGON_TYPES = ("polygon", "polygonlabels")
_BRUSH_TYPES = ("brush", "brushlabels")
# Region tools of Label Studio's image tags; other result items (textarea, choices, labels, ...) describe a
# region, they are not one.
_REGION_TYPES = (
    *_RECTANGLE_TYPES,
    *_POLYGON_TYPES,
    *_BRUSH_TYPES,
    "keypoint",
    "keypointlabels",
    "ellipse",
    "ellipselabels",
    "bitmask",
    "bitmasklabels",
    "magicwand",
    "vector",
    "vectorlabels",
)
# Fetched and labeled aspect ratios closer than this are the same image (rounding of small images).
_ASPECT_TOLERANCE = 0.02


@dataclass
class Conversion:
    records: list[dict]
    report: dict[str, Any]


# --- which annotations ---------------------------------------------------------------------------------


def select_annotations(
    task: Mapping[str, Any], scheme: LabelingScheme
) -> tuple[list[dict], list[tuple[dict, str]]]:
    """The annotations of `task` to export (by id), and the others with the reason they are left out."""
    kept, skipped = [], []
    for annotation in _annotations(task):
        if annotation.get("was_cancelled"):
            skipped.append((annotation, "cancelled"))
        elif not annotation["result"]:
            skipped.append((annotation, "empty"))
        elif not _usable_regions(annotation, scheme):
            skipped.append((annotation, "no_rectangles"))
        else:
            kept.append(annotation)
    ground_truth = [annotation for annotation in kept if annotation.get("ground_truth")]
    if ground_truth:
        winner = max(ground_truth, key=lambda a: (a.get("updated_at") or "", a["id"]))
        skipped += [
            (annotation, "superseded_by_ground_truth") for annotation in kept if annotation is not winner
        ]
        kept = [winner]
    return kept, sorted(skipped, key=lambda pair: pair[0]["id"])


def images_needed(tasks: Iterable[Mapping[str, Any]], scheme: LabelingScheme) -> dict[str, int]:
    """{image URL: id of the first task using it} over the tasks with an annotation to export."""
    needed: dict[str, int] = {}
    for task in _sorted_tasks(tasks):
        url = _image_url(task, scheme)
        if url is not None and select_annotations(task, scheme)[0]:
            needed.setdefault(url, task["id"])
    return needed


# --- the pure conversion -------------------------------------------------------------------------------


def convert_tasks(
    tasks: Iterable[Mapping[str, Any]],
    scheme: LabelingScheme,
    prompts: Prompts,
    project: int,
    images: Mapping[str, StoredImage | str],
) -> Conversion:
    """Records and the report for an exported task list.

    `images` maps every URL of `images_needed` to its StoredImage, or to the reason it could not be had.
    Raises ValueError for a task list that is not Label Studio's JSON export.
    """
    tasks = _sorted_tasks(tasks)
    tally = _Tally(shared_ids=_shared_annotation_ids(tasks))
    records = []
    for task in tasks:
        tally.task = task["id"]
        kept, skipped = select_annotations(task, scheme)
        for annotation in _annotations(task):
            tally.annotations_total += 1
            tally.regions_total += len(_region_items(annotation, scheme))
        for annotation, reason in skipped:
            tally.skip_annotation(annotation, scheme, reason)
        for annotation in kept:
            record = _record(task, annotation, scheme, prompts, project, images, tally)
            if record is not None:
                records.append(record)
    image_errors = {url: reason for url, reason in images.items() if isinstance(reason, str)}
    return Conversion(records, tally.report(project, scheme, records, image_errors))


@dataclass
class _Tally:
    """Where every annotation and every region went: into a record, or left out for a reason."""

    shared_ids: set[int] = field(default_factory=set)  # annotation ids that more than one task uses
    task: int | None = None  # the task being converted
    annotations_total: int = 0
    annotations_skipped: dict[str, list[int | str]] = field(default_factory=dict)
    regions_total: int = 0
    regions_skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip_annotation(
        self,
        annotation: Mapping[str, Any],
        scheme: LabelingScheme,
        reason: str,
        *,
        with_regions: bool = True,
        regions: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Leave out an annotation; `with_regions`: its regions too (all, or `regions`), as "annotation_<reason>"."""
        self.annotations_skipped.setdefault(reason, []).append(self.annotation_ref(annotation))
        if with_regions:
            for region in _region_items(annotation, scheme) if regions is None else regions:
                self.skip_region(annotation, region, f"annotation_{reason}")

    def skip_region(self, annotation: Mapping[str, Any], region: Mapping[str, Any], reason: str) -> None:
        ref = _region_ref(annotation, region)
        if annotation["id"] in self.shared_ids:
            ref = f"{self.task}/{ref}"
        self.regions_skipped.setdefault(reason, []).append(ref)

    def annotation_ref(self, annotation: Mapping[str, Any]) -> int | str:
        """The annotation's id, or "<task>/<id>" for an id that several tasks use."""
        return f"{self.task}/{annotation['id']}" if annotation["id"] in self.shared_ids else annotation["id"]

    def report(
        self, project: int, scheme: LabelingScheme, records: Sequence[dict], image_errors: Mapping[str, str]
    ) -> dict[str, Any]:
        answers = [turn for record in records for turn in record["conversations"] if turn["from"] == "gpt"]
        by_origin = dict.fromkeys(ORIGINS, 0)
        for turn in answers:
            by_origin[turn["source"]["origin"]] = by_origin.get(turn["source"]["origin"], 0) + 1
        report = {
            "project": project,
            "kind": scheme.kind,
            "annotations_total": self.annotations_total,
            "annotations_exported": len(records),
            "annotations_skipped": {
                reason: sorted(ids, key=_ref_order) for reason, ids in self.annotations_skipped.items()
            },
            "regions_total": self.regions_total,
            "regions_exported": sum(len(record["regions"]) for record in records),
            "regions_skipped": self.regions_skipped,
            "answers": len(answers),
            "by_origin": by_origin,
            "records": len(records),
            "images": len({record["image"] for record in records}),
            "image_errors": dict(image_errors),
        }
        check_report(report)
        return report


def check_report(report: Mapping[str, Any]) -> None:
    """Raise AssertionError unless every annotation, region and answer of `report` is accounted for once."""
    for unit, listed in (("annotations", "annotations_skipped"), ("regions", "regions_skipped")):
        skipped = [ref for refs in report[listed].values() for ref in refs]
        if len(skipped) != len(set(skipped)):
            raise AssertionError(f"export report lists some {unit} under two reasons: {report[listed]}")
        if report[f"{unit}_exported"] + len(skipped) != report[f"{unit}_total"]:
            raise AssertionError(
                f"export report: {report[f'{unit}_exported']} {unit} exported + {len(skipped)} skipped "
                f"!= {report[f'{unit}_total']} in total"
            )
    if sum(report["by_origin"].values()) != report["answers"]:
        raise AssertionError(
            f"export report: by_origin {report['by_origin']} does not add up to {report['answers']}"
        )
    if report["records"] != report["annotations_exported"]:
        raise AssertionError("export report: records and exported annotations differ")


def _record(
    task: Mapping[str, Any],
    annotation: Mapping[str, Any],
    scheme: LabelingScheme,
    prompts: Prompts,
    project: int,
    images: Mapping[str, StoredImage | str],
    tally: _Tally,
) -> dict | None:
    """The record of one annotation, or None (the tally says why)."""
    url = _image_url(task, scheme)
    if url is None:
        tally.skip_annotation(annotation, scheme, "no_image")
        return None
    if url not in images:
        raise ValueError(f"no image and no failure given for {url!r} (task {task['id']}): see images_needed")
    image = images[url]
    if not isinstance(image, StoredImage):
        tally.skip_annotation(annotation, scheme, "image_unavailable")
        return None
    for region in _region_items(annotation, scheme):
        reason = _unusable_reason(region, scheme)
        if reason is not None:
            tally.skip_region(annotation, region, reason)

    prediction = _source_prediction(task, annotation)
    if scheme.kind == "reasoning":
        turns = _reasoning_turns(task, annotation, scheme, image, prediction, tally)
    else:
        turns = _region_turns(annotation, scheme, prompts, image, prediction, tally)
    if turns is None:
        return None
    region_ids, boxes, masks, conversation = turns
    if not conversation:
        # Each rectangle is already listed with its own reason.
        tally.skip_annotation(annotation, scheme, "no_answered_regions", with_regions=False)
        return None

    answers = [turn["source"] for turn in conversation if turn["from"] == "gpt"]
    origins = {answer["origin"] for answer in answers}
    record = {
        "id": f"ls:{project}:{task['id']}:{annotation['id']}",
        "image": image.path,
        "width": image.width,
        "height": image.height,
        "regions": boxes,
        "conversations": conversation,
        "source": {
            "project": project,
            "task": task["id"],
            "annotation": annotation["id"],
            "updated_at": annotation.get("updated_at"),
            "annotator": _annotator(annotation),
            "ground_truth": bool(annotation.get("ground_truth")),
            "origin": origins.pop() if len(origins) == 1 else MIXED_ORIGIN,
            "model_version": _mapping(prediction).get("model_version"),
            # One answer: its suggestion; several: see each answer turn's source.
            "suggestion": answers[0]["suggestion"] if len(answers) == 1 else None,
            "region_ids": region_ids,
        },
    }
    if any(mask is not None for mask in masks):
        record["masks"] = masks
    parse(TrainingRecord, record, f"the record of annotation {annotation['id']}")  # what training will read
    return record


def _region_turns(
    annotation: Mapping[str, Any],
    scheme: LabelingScheme,
    prompts: Prompts,
    image: StoredImage,
    prediction: Mapping[str, Any] | None,
    tally: _Tally,
) -> tuple[list[str], list[list[int]], list[dict | None], list[dict]]:
    """caption, region_qa, classification: a question and an answer per answered region."""
    answers = _items_by_region(annotation["result"], scheme.answer)
    typed = _items_by_region(annotation["result"], scheme.question) if scheme.kind == "region_qa" else {}
    suggested = _items_by_region(_mapping(prediction).get("result") or [], scheme.answer)
    region_ids: list[str] = []
    boxes: list[list[int]] = []
    masks: list[dict | None] = []
    conversation: list[dict] = []
    for rectangle, box, mask in _pixel_boxes(annotation, scheme, image):
        region_id = str(rectangle.get("id"))
        if isinstance(box, str):
            tally.skip_region(annotation, rectangle, box)
            continue
        answer_item = answers.get(region_id)
        answer, reason = _answer(answer_item, scheme)
        question = None
        if reason is None:
            question, reason = _question(scheme, prompts, typed.get(region_id))
        if reason is not None:
            tally.skip_region(annotation, rectangle, reason)
            continue
        number = len(boxes) + 1
        origin = _origin(answer_item, rectangle)
        conversation += _turn_pair(
            _renumbered(question, number),
            answer,
            scheme,
            region_id,
            origin,
            _suggestion(origin, suggested.get(region_id), scheme),
        )
        region_ids.append(region_id)
        boxes.append(box)
        masks.append(mask)
    return region_ids, boxes, masks, conversation


def _reasoning_turns(
    task: Mapping[str, Any],
    annotation: Mapping[str, Any],
    scheme: LabelingScheme,
    image: StoredImage,
    prediction: Mapping[str, Any] | None,
    tally: _Tally,
) -> tuple[list[str], list[list[int]], list[dict | None], list[dict]] | None:
    """reasoning: the task's question over all rectangles (in result order) and the annotation's answer."""
    pixel_boxes = _pixel_boxes(annotation, scheme, image)
    question = _mapping(task.get("data")).get(scheme.question_key)
    answer_item = next((i for i in annotation["result"] if i.get("from_name") == scheme.answer), None)
    answer = textarea_text(answer_item)
    tags = [int(k) for k in REGION_REFERENCE.findall(question)] if isinstance(question, str) else []
    if any(not isinstance(box, list) for _, box, _ in pixel_boxes):
        reason = "unusable_box"  # the question numbers the rectangles: one bad box breaks the numbering
    elif not isinstance(question, str) or not question.strip():
        reason = "no_question"
    elif not answer:
        reason = "no_answer"
    elif any(not 1 <= k <= len(pixel_boxes) for k in tags):
        reason = "question_refers_to_missing_region"
    else:
        reason = None
    if reason is not None:
        tally.skip_annotation(annotation, scheme, reason, regions=_usable_regions(annotation, scheme))
        return None
    prediction_answer = next(
        (i for i in _mapping(prediction).get("result") or [] if i.get("from_name") == scheme.answer), None
    )
    origin = _origin(answer_item, None)
    conversation = _turn_pair(
        question.strip(), answer, scheme, None, origin, _suggestion(origin, prediction_answer, scheme)
    )
    return (
        [str(rectangle.get("id")) for rectangle, _, _ in pixel_boxes],
        [box for _, box, _ in pixel_boxes],
        [mask for _, _, mask in pixel_boxes],
        conversation,
    )


def _turn_pair(
    question: str,
    answer: str,
    scheme: LabelingScheme,
    region_id: str | None,
    origin: str,
    suggestion: str | None,
) -> list[dict]:
    return [
        {"from": "human", "value": question, "kind": scheme.kind},
        {
            "from": "gpt",
            "value": answer,
            "source": {"region": region_id, "origin": origin, "suggestion": suggestion},
        },
    ]


def _pixel_boxes(
    annotation: Mapping[str, Any], scheme: LabelingScheme, image: StoredImage
) -> list[tuple[Mapping[str, Any], list[int] | str, dict | None]]:
    """Each usable region in result order with its pixel box (or the reason it has none) and its mask."""
    boxes: list[tuple[Mapping[str, Any], list[int] | str, dict | None]] = []
    seen = set()
    for region in _usable_regions(annotation, scheme):
        region_id = region.get("id")
        if region_id is None or str(region_id) in seen:
            boxes.append((region, "no_region_id" if region_id is None else "duplicate_region_id", None))
            continue
        seen.add(str(region_id))
        try:
            geometry = _geometry(region, image)
        except (ValueError, OverflowError, TypeError):  # no numeric geometry, or NaN/infinity in it
            boxes.append((region, "invalid_box", None))
            continue
        if isinstance(geometry, str):
            boxes.append((region, geometry, None))
            continue
        box, mask = geometry
        boxes.append((region, box if box[2] > box[0] and box[3] > box[1] else "empty_box", mask))
    return boxes


def _geometry(region: Mapping[str, Any], image: StoredImage) -> tuple[list[int], dict | None] | str:
    """The pixel box of a region of the fetched image and its mask (None for a rectangle), or a reason.

    Raises ValueError (or TypeError) for geometry that is not finite numbers."""
    kind = _item_type(region)
    value = _mapping(region.get("value"))
    if kind in _POLYGON_TYPES:
        points = value.get("points")
        if not isinstance(points, list) or len(points) < 3:
            return "invalid_polygon"
        pixels = [
            [round(_percent(x) / 100 * image.width, 2), round(_percent(y) / 100 * image.height, 2)]
            for x, y in points
        ]
        xs, ys = (
            [min(max(x, 0), image.width) for x, _ in pixels],
            [min(max(y, 0), image.height) for _, y in pixels],
        )
        box = [math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)), math.ceil(max(ys))]
        return box, {"type": "polygon", "points": pixels}
    if kind in _BRUSH_TYPES:
        return _brush_geometry(region, value, image)
    if value.get("rotation") and _aspect_disagrees(region, image):
        # LS rotated the box in its own pixel space: with another aspect ratio the bounding box is wrong.
        return "rotated_box_aspect_mismatch"
    # The size of the image as fetched, not LS's original_width/height (possibly stale): rotated boxes
    # need the true aspect ratio.
    sized = {**region, "original_width": image.width, "original_height": image.height}
    x1, y1, x2, y2 = region_from_item(sized).box
    box = [
        round(x1 * image.width),
        round(y1 * image.height),
        round(x2 * image.width),
        round(y2 * image.height),
    ]
    return box, None


def _brush_geometry(
    region: Mapping[str, Any], value: Mapping[str, Any], image: StoredImage
) -> tuple[list[int], dict] | str:
    """A brush mask (LS RLE of an RGBA image of original_width x original_height): its bounding box, scaled
    to the fetched image, and the mask as LS stores it."""
    rle, width, height = value.get("rle"), region.get("original_width"), region.get("original_height")
    if value.get("format", "rle") != "rle" or not isinstance(rle, list) or not rle:
        return "invalid_mask"
    if not (_is_id(width) and _is_id(height) and width > 0 and height > 0):
        return "mask_without_size"
    if not all(_is_id(byte) and 0 <= byte < 256 for byte in rle):
        return "invalid_mask"
    try:
        pixels = decode_rle(rle)
    except (IndexError, ValueError):
        return "invalid_mask"
    if pixels.size != width * height * 4:
        return "invalid_mask"
    alpha = pixels.reshape(height, width, 4)[:, :, 3] > 0
    rows, columns = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if not rows.size:
        return "empty_box"
    x_scale, y_scale = image.width / width, image.height / height
    box = [
        math.floor(columns[0] * x_scale),
        math.floor(rows[0] * y_scale),
        min(math.ceil((columns[-1] + 1) * x_scale), image.width),
        min(math.ceil((rows[-1] + 1) * y_scale), image.height),
    ]
    return box, {"type": "brush", "format": "rle", "rle": list(rle), "width": width, "height": height}


def _aspect_disagrees(region: Mapping[str, Any], image: StoredImage) -> bool:
    width, height = region.get("original_width"), region.get("original_height")
    if not (_is_id(width) and _is_id(height) and width > 0 and height > 0):
        return False  # nothing to disagree with
    labeled, fetched = width / height, image.width / image.height
    return abs(labeled - fetched) > _ASPECT_TOLERANCE * fetched


def _percent(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"not a finite percentage: {str(value)[:40]}")
    return float(value)


def _answer(item: Mapping[str, Any] | None, scheme: LabelingScheme) -> tuple[str | None, str | None]:
    """(answer, None) or (None, reason)."""
    if scheme.answer_type == "textarea":
        # A suggestion accepted with its cut-off mark still trains on the words, never on the mark.
        text = textarea_text(item).replace(TRUNCATED_MARK, "").strip()
        if text.startswith(FAILED_MARK):
            return None, "model_failure_not_replaced"
        return (text, None) if text else (None, "no_text")
    chosen = _mapping(_mapping(item).get("value")).get("choices") or []
    if not chosen:
        return None, "no_choice"
    if len(chosen) > 1:
        return None, "several_choices"
    if chosen[0] not in scheme.choices:
        return None, "choice_not_in_config"
    return chosen[0], None


def _question(
    scheme: LabelingScheme, prompts: Prompts, typed_item: Mapping[str, Any] | None
) -> tuple[str | None, str | None]:
    """The question about one region, in terms of <region1>: (question, None) or (None, reason)."""
    if scheme.kind == "caption":
        return prompts.caption, None
    if scheme.kind == "classification":
        return prompts.classification_text(scheme.choices), None
    typed = textarea_text(typed_item)
    if not typed:
        return None, "no_question"
    typed = region_question(typed)  # as the backend asks it
    if any(k != "1" for k in REGION_REFERENCE.findall(typed)):
        return None, "question_refers_to_other_region"
    return typed, None


def _renumbered(question: str, number: int) -> str:
    """The question about region 1 asked about region `number` of the record."""
    return REGION_REFERENCE.sub(lambda m: f"<region{number}>" if m.group(1) == "1" else m.group(0), question)


def _suggestion(origin: str, suggested_item: Mapping[str, Any] | None, scheme: LabelingScheme) -> str | None:
    if origin != "prediction-changed" or suggested_item is None:
        return None
    if scheme.answer_type == "choices":
        chosen = _mapping(suggested_item.get("value")).get("choices") or []
        return ", ".join(str(choice) for choice in chosen) or None
    return textarea_text(suggested_item) or None


def _origin(answer_item: Mapping[str, Any] | None, rectangle: Mapping[str, Any] | None) -> str:
    for item in (answer_item, rectangle):
        origin = _mapping(item).get("origin")
        if isinstance(origin, str) and origin:
            return origin
    return UNKNOWN_ORIGIN


def _source_prediction(task: Mapping[str, Any], annotation: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The prediction the annotation came from, or None (see the module docstring)."""
    parent = annotation.get("parent_prediction")
    if parent is not None:
        return _known_predictions(task).get(parent)
    viewed = annotation.get("prediction")
    derived = any(item.get("origin") in ("prediction", "prediction-changed") for item in annotation["result"])
    return viewed if derived and isinstance(viewed, Mapping) and viewed.get("result") is not None else None


def _known_predictions(task: Mapping[str, Any]) -> dict[Any, Mapping[str, Any]]:
    """The full predictions the export holds for a task, by id.

    LS 1.23's JSON export lists a task's predictions by id only, but every annotation carries the
    prediction LS recorded for it in full.
    """
    known: dict[Any, Mapping[str, Any]] = {}
    predictions, annotations = task.get("predictions"), task.get("annotations")
    candidates = (
        [
            *(predictions if isinstance(predictions, list) else []),
            *(a.get("prediction") for a in annotations if isinstance(a, Mapping)),
        ]
        if isinstance(annotations, list)
        else []
    )
    for prediction in candidates:
        if isinstance(prediction, Mapping) and prediction.get("id") is not None:
            known.setdefault(prediction["id"], prediction)
    return known


def unresolved_parent_predictions(task: Any) -> set:
    """parent_prediction ids of a task's annotations whose full prediction the export lacks (none for
    anything that is not a task: convert_tasks reports those)."""
    if not isinstance(task, Mapping) or not _is_id(task.get("id")):
        return set()
    annotations = task.get("annotations")
    if not isinstance(annotations, list):
        return set()
    parents = {a.get("parent_prediction") for a in annotations if isinstance(a, Mapping)} - {None}
    return parents - set(_known_predictions(task))


# --- reading LS's JSON ---------------------------------------------------------------------------------


def _sorted_tasks(tasks: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(tasks, Mapping | str | bytes):
        raise ValueError("the export must be a list of tasks (Label Studio's JSON export format)")
    checked = []
    for index, task in enumerate(tasks):
        if _looks_json_min(task):
            raise ValueError(
                "this is Label Studio's JSON-MIN export, which drops the link between a box and its text: "
                "export the project as JSON (the full format) instead"
            )
        if not isinstance(task, Mapping) or not _is_id(task.get("id")):
            raise ValueError(f"export entry {index} is not a task with an integer 'id': {str(task)[:200]}")
        checked.append(task)
    ids = [task["id"] for task in checked]
    if len(ids) != len(set(ids)):
        raise ValueError("the export lists a task id twice")
    return sorted(checked, key=lambda task: task["id"])


def _looks_json_min(entry: Any) -> bool:
    """A JSON-MIN entry: a task's data keys at the top level, with no "data", and for an annotated task
    one annotation flattened into it ("annotation_id", the control names) instead of "annotations"."""
    return (
        isinstance(entry, Mapping)
        and "data" not in entry
        and ("annotation_id" in entry or "annotations" not in entry)
    )


def _annotations(task: Mapping[str, Any]) -> list[dict]:
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise ValueError(f"task {task['id']}: 'annotations' is not a list")
    for annotation in annotations:
        if not isinstance(annotation, Mapping) or not _is_id(annotation.get("id")):
            raise ValueError(f"task {task['id']}: an annotation has no integer 'id': {str(annotation)[:200]}")
        result = annotation.get("result")
        if not isinstance(result, list) or not all(isinstance(item, Mapping) for item in result):
            raise ValueError(f"annotation {annotation['id']}: 'result' is not a list of result items")
    return sorted(annotations, key=lambda annotation: annotation["id"])


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _item_type(item: Mapping[str, Any]) -> str:
    kind = item.get("type")
    return kind.lower() if isinstance(kind, str) else ""


def _region_items(annotation: Mapping[str, Any], scheme: LabelingScheme) -> list[Mapping[str, Any]]:
    """Every region of the annotation, on any image and of any tool, in result order."""
    return [
        item
        for item in annotation["result"]
        if item.get("from_name") == scheme.rectangle or _item_type(item) in _REGION_TYPES
    ]


def _unusable_reason(region: Mapping[str, Any], scheme: LabelingScheme) -> str | None:
    """Why a region cannot become a box of the scheme's image, or None when it can."""
    to_name = region.get("to_name")
    if to_name is not None and to_name != scheme.image:
        return "on_other_image"
    kind = _item_type(region)
    if region.get("from_name") == scheme.rectangle or kind in (*_POLYGON_TYPES, *_BRUSH_TYPES):
        return None
    if kind in _RECTANGLE_TYPES:
        return "rectangle_of_other_control"
    return f"unsupported_{kind}"


def _usable_regions(annotation: Mapping[str, Any], scheme: LabelingScheme) -> list[Mapping[str, Any]]:
    return [item for item in _region_items(annotation, scheme) if _unusable_reason(item, scheme) is None]


def _shared_annotation_ids(tasks: Sequence[Mapping[str, Any]]) -> set[int]:
    """Annotation ids that appear in more than one task (LS's own fixtures reuse them)."""
    owners: dict[int, set[int]] = {}
    for task in tasks:
        for annotation in _annotations(task):
            owners.setdefault(annotation["id"], set()).add(task["id"])
    return {annotation for annotation, tasks_of in owners.items() if len(tasks_of) > 1}


def _ref_order(ref: int | str) -> tuple[int, ...]:
    return (ref,) if isinstance(ref, int) else tuple(int(part) for part in ref.split("/"))


def _region_ref(annotation: Mapping[str, Any], rectangle: Mapping[str, Any]) -> str:
    """How the report names a rectangle: annotation id:region id, plus #2, #3 ... for reused ids."""
    twins = [
        item
        for item in annotation["result"]
        if item is rectangle  # an id like NaN equals nothing, itself included
        or (item.get("from_name") == rectangle.get("from_name") and item.get("id") == rectangle.get("id"))
    ]
    position = next(index for index, item in enumerate(twins, start=1) if item is rectangle)
    ref = f"{annotation['id']}:{rectangle.get('id')}"
    return ref if position == 1 else f"{ref}#{position}"


def _items_by_region(
    result: Iterable[Mapping[str, Any]], control: str | None
) -> dict[str, Mapping[str, Any]]:
    """The items of `control` by region id; the first wins."""
    items: dict[str, Mapping[str, Any]] = {}
    for item in result:
        if control is not None and item.get("from_name") == control:
            items.setdefault(str(item.get("id")), item)
    return items


def _image_url(task: Mapping[str, Any], scheme: LabelingScheme) -> str | None:
    url = _mapping(task.get("data")).get(scheme.image_key)
    return url.strip() if isinstance(url, str) and url.strip() else None


def _mapping(value: Any) -> Mapping[str, Any]:
    """`value` when it is a JSON object, else an empty one: a malformed part reads as a missing one."""
    return value if isinstance(value, Mapping) else {}


def _annotator(annotation: Mapping[str, Any]) -> Any:
    completed_by = annotation.get("completed_by")
    # The JSON export gives the user id; some serializations give the user object.
    return completed_by.get("id") if isinstance(completed_by, Mapping) else completed_by
