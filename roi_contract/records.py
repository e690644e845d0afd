"""Training records (DESIGN.md, "Training records"): spatial-instruction data, one JSON object a line.

    {"id": "ls:3:17:42", "image": "images/5f2c9a.jpg", "width": 800, "height": 600,
     "regions": [[80, 120, 360, 360]],
     "conversations": [{"from": "human", "value": "Describe <region1> briefly.", "kind": "caption"},
                       {"from": "gpt", "value": "a large red circle", "source": {...}}],
     "source": {...}}

`regions` are pixel boxes [x1, y1, x2, y2] of the displayed image; `<regionK>` refers to regions[K-1].
`image` is relative to the folder of the JSONL file. `source` is provenance: the Label Studio project, task
and annotation a record came from (backend/export.py), or the synthetic world's seed (roi_model/synthetic.py).
The export writes records, roi_model's training and evaluation read them: both validate with this model.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PositiveInt, model_validator

from roi_contract.validation import ContractModel


def _checked_pixel_box(box: list[int]) -> list[int]:
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise ValueError("a pixel box needs 0 <= x1 < x2 and 0 <= y1 < y2")
    return box


PixelBox = Annotated[list[int], Field(min_length=4, max_length=4), AfterValidator(_checked_pixel_box)]


class Turn(ContractModel):
    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: str
    kind: str | None = None  # human turns: the question's kind (caption, colour, left, ...), for evaluation
    source: dict[str, Any] | None = None  # gpt turns of an export: the answer's origin and suggestion


class TrainingRecord(ContractModel):
    id: str
    image: Annotated[str, Field(min_length=1)]
    width: PositiveInt
    height: PositiveInt
    regions: list[PixelBox]
    conversations: Annotated[list[Turn], Field(min_length=2)]
    objects: list[dict[str, Any]] | None = None  # the synthetic world's ground truth per region
    # Per region, the shape the annotator drew when it was not a box (None for a box): a polygon's pixel
    # points {"type": "polygon", "points": [[x, y], ...]}, or a brush mask as Label Studio stores it
    # {"type": "brush", "format": "rle", "rle": [...], "width": w, "height": h}. The box is its bounding box.
    masks: list[dict[str, Any] | None] | None = None
    source: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainingRecord:
        for x1, y1, x2, y2 in self.regions:
            if x2 > self.width or y2 > self.height:
                raise ValueError(
                    f"region {[x1, y1, x2, y2]} lies outside the {self.width}x{self.height} image"
                )
        if self.masks is not None and len(self.masks) != len(self.regions):
            raise ValueError(f"{len(self.masks)} masks for {len(self.regions)} regions")
        speakers = [turn.speaker for turn in self.conversations]
        if len(speakers) % 2 or speakers != ["human", "gpt"] * (len(speakers) // 2):
            raise ValueError("conversations must alternate human, gpt, starting with human")
        return self


def dataset_digest(data: bytes) -> str:
    """The digest a model card records for the dataset file it was trained on."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# A quarter of a project's tasks are held out from its fine-tunes to judge them.
HELD_OUT_SHARE = 0.25


def is_held_out(task_id: int, share: float = HELD_OUT_SHARE) -> bool:
    """A task's side of the train / held-out split, fixed by its id: the same task is held out in every run,
    and the backend can tell before a run whether both sides have tasks."""
    digest = hashlib.sha256(f"task:{task_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share
