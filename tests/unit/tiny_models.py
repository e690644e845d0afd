"""Tiny region-LLMs built from config alone, for the model tests."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from roi_model.assembly import build_model
from roi_model.tiny import tiny_config, train_word_tokenizer

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
