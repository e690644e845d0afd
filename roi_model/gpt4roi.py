"""The GPT4RoI-architecture region-LLM as a region model (roi_model.region_model): the existing engine,
which already answers batches of region questions, plus the family's name, saving and training examples."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from roi_contract.records import TrainingRecord

from .engine import RegionEngine
from .region_model import TrainingExample


class GPT4RoIRegionModel(RegionEngine):
    family = "region_llm"

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    def training_examples(self, record: TrainingRecord, image: Image.Image) -> list[TrainingExample]:
        boxes = [
            [x1 / record.width, y1 / record.height, x2 / record.width, y2 / record.height]
            for x1, y1, x2, y2 in record.regions
        ]
        pixels = self.processor.pixel_values(image)
        examples = []
        turns = record.conversations
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            encoded = self.processor.encode(
                [("user", human.value), ("assistant", gpt.value)], len(boxes), generation=False
            )
            examples.append(
                TrainingExample(
                    inputs={
                        "input_ids": torch.tensor([encoded.input_ids]),
                        "pixel_values": pixels.unsqueeze(0),
                        "boxes": [torch.tensor([boxes[i] for i in encoded.box_order], dtype=torch.float32)],
                    },
                    labels=torch.tensor([encoded.labels]),
                )
            )
        return examples
