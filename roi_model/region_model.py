"""The region-model interface every family implements (issue 16).

A family is a kind of model that can answer questions about boxes on an image: the GPT4RoI-architecture
region-LLM of this project (roi_model.gpt4roi), Qwen2.5-VL and Qwen3-VL (roi_model.qwen_vl). The worker,
`roi-model describe|eval` and the registry speak only this interface; roi_model.families picks the
family of a model directory from its config.json and loads it.

The describe contract (roi_contract.describe): a box is [x1, y1, x2, y2] in 0..1 of the displayed image,
`<regionK>` in a question's text means the K-th box of that question. Each family turns that into what
its model reads: RoI tokens for the region-LLM, coordinates in the prompt for Qwen-VL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from roi_contract.records import TrainingRecord

from .engine import ImageRequest, RegionQuery
from .generation import Answer, GenerationOptions

__all__ = [
    "Answer",
    "GenerationOptions",
    "ImageRequest",
    "RegionModel",
    "RegionQuery",
    "TrainingExample",
]


@dataclass
class TrainingExample:
    """One teacher-forced example: the model's keyword inputs, and labels (-100 outside the answer)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor


@runtime_checkable
class RegionModel(Protocol):
    family: str  # "region_llm", "qwen2_5_vl", "qwen3_vl"
    model: torch.nn.Module
    processor: Any  # has .tokenizer: the worker checks question lengths with it

    @property
    def device(self) -> torch.device: ...

    def answer(self, requests: Sequence[ImageRequest], *, remember: bool = True) -> list[list[Answer]]:
        """Every answer of every request (one image, many region questions), in order.

        remember=False: add nothing to any cache kept between calls (bulk work that sees each image once).
        """
        ...

    def stats(self) -> dict: ...

    def save_pretrained(self, directory: str | Path) -> None:
        """Model, tokenizer and processor, loadable again by roi_model.families.load_region_model."""
        ...

    def training_examples(self, record: TrainingRecord, image: Image.Image) -> list[TrainingExample]:
        """One example per human/gpt exchange of the record, in this family's prompt convention."""
        ...
