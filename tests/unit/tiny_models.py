"""Tiny region-LLMs built from config alone, for the model tests."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from roi_model.assembly import build_model
from roi_model.presets import tiny_config
from roi_model.training import RegionCollator
from roi_model.word_tokenizer import train_word_tokenizer

TEXTS = [
    "describe briefly a large small red green blue circle square triangle",
    "what colour shape size is left of which larger or yes no",
]


def make_tiny(kind: str = "convnext", **overrides):
    torch.manual_seed(0)
    model, processor = build_model(tiny_config(kind, **overrides), train_word_tokenizer(TEXTS))
    return model.eval(), processor


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def training_batch(processor, directory, examples) -> dict:
    """A training batch from (image, normalized boxes, turns) examples, one row each, through
    training.RegionCollator: the images are written to `directory` as records point to them."""
    records = []
    for number, (image, boxes, turns) in enumerate(examples):
        name = f"example-{number}.png"
        image.save(directory / name)
        width, height = image.size
        records.append(
            {
                "image": name,
                "width": width,
                "height": height,
                "regions": [[x1 * width, y1 * height, x2 * width, y2 * height] for x1, y1, x2, y2 in boxes],
                "conversations": [
                    {"from": "human" if role == "user" else "gpt", "value": text} for role, text in turns
                ],
                "_root": str(directory),
            }
        )
    return RegionCollator(processor, split_turns=False)(records)
