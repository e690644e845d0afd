"""The processor: images, boxes and conversations in; tensors the model takes out.

Images are EXIF-oriented, converted to RGB and stretched to the vision resolution (GPT4RoI
stretches too, so normalized boxes keep their meaning). Boxes are normalized xyxy in 0..1 of
the displayed image. A conversation is rendered by the configured template and tokenized once;
character offsets turn the template's target segments into the loss mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from roi_contract.images import decode_displayed, displayed

from .configuration import RegionLLMConfig
from .prompts import (
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    GPT4RoIV0Template,
    expand_region_references,
    image_token_text,
)

IGNORE_INDEX = -100
BOX_TOLERANCE = 1e-3  # rounding in Label Studio's percentages may overshoot the edge slightly

Box = Sequence[float]
Turn = tuple[str, str]  # ("user" | "assistant", text)


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    box_order: list[int]  # box index for each <bbox> token, in order


@dataclass
class TrainingExample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # (3, size, size)
    boxes: torch.Tensor  # (n, 4), in <bbox> order


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """The image as displayed (roi_contract.images: the decoder serving uses too). ValueError names a problem."""
    if isinstance(source, Image.Image):
        return displayed(source)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return decode_displayed(data)


def check_boxes(boxes: Sequence[Box]) -> torch.Tensor:
    """Normalized xyxy boxes as an (n, 4) float tensor; each bad box raises its own message."""
    checked = []
    for number, box in enumerate(boxes, start=1):
        if len(box) != 4:
            raise ValueError(f"box {number} has {len(box)} numbers; expected x1, y1, x2, y2")
        x1, y1, x2, y2 = (float(value) for value in box)
        if min(x1, y1, x2, y2) < -BOX_TOLERANCE or max(x1, y1, x2, y2) > 1 + BOX_TOLERANCE:
            raise ValueError(
                f"box {number} {list(box)} lies outside the image: coordinates must be in [0, 1]"
            )
        x1, y1, x2, y2 = (min(max(value, 0.0), 1.0) for value in (x1, y1, x2, y2))
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"box {number} {list(box)} has zero area: need x1 < x2 and y1 < y2")
        checked.append([x1, y1, x2, y2])
    return torch.tensor(checked, dtype=torch.float32).reshape(-1, 4)


class RegionProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: RegionLLMConfig, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.config = config
        self.num_image_tokens = num_image_tokens
        if config.template == "chat":
            self.template = ChatTemplate(tokenizer, config.system_prompt)
        else:
            self.template = GPT4RoIV0Template(config.system_prompt)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, config: RegionLLMConfig, num_image_tokens: int
    ) -> RegionProcessor:
        return cls(AutoTokenizer.from_pretrained(directory), config, num_image_tokens)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)

    # images -----------------------------------------------------------------------------------------
    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        size = self.config.image_size
        stretched = image.resize((size, size), Image.Resampling.BICUBIC)
        tensor = TF.to_dtype(TF.pil_to_tensor(stretched), torch.float32, scale=True)
        return TF.normalize(tensor, self.config.image_mean, self.config.image_std)

    # text -------------------------------------------------------------------------------------------
    def encode(self, turns: list[Turn], num_boxes: int, *, generation: bool) -> EncodedConversation:
        """Render and tokenize a conversation; the first user turn carries the image."""
        if not turns or turns[0][0] != "user":
            raise ValueError("a conversation must start with a user turn")
        user_texts = [text for role, text in turns if role == "user"]
        if not any(text.strip() for text in user_texts):
            raise ValueError("the question is empty")
        expanded, box_order = expand_region_references(user_texts, num_boxes)
        expanded_iter = iter(expanded)
        rendered = [(role, next(expanded_iter) if role == "user" else text) for role, text in turns]
        rendered[0] = ("user", self.config.image_prompt + rendered[0][1])

        image_text = image_token_text(self.num_image_tokens)
        text, target_spans = "", []
        for segment in self.template.segments(rendered, generation=generation):
            piece = segment.text.replace(IMAGE_PLACEHOLDER, image_text)
            if segment.target:
                target_spans.append((len(text), len(text) + len(piece)))
            text += piece

        encoding = self.tokenizer(
            text, add_special_tokens=self.template.add_special_tokens, return_offsets_mapping=True
        )
        labels = [
            token if any(start <= offset < end for start, end in target_spans) else IGNORE_INDEX
            for token, (offset, _) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
        ]
        return EncodedConversation(encoding["input_ids"], labels, box_order)

    def clean_answer(self, token_ids: Sequence[int], stop_strings: Sequence[str] = ()) -> str:
        """The answer text: cut at the first stop string, without the template's role marker."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = min((text.find(stop) for stop in stop_strings if stop in text), default=len(text))
        return self.template.clean_answer(text[:cut])

    # training ---------------------------------------------------------------------------------------
    def training_example(
        self, image: Image.Image, boxes: Sequence[Box], turns: list[Turn]
    ) -> TrainingExample:
        checked = check_boxes(boxes)
        encoded = self.encode(turns, len(checked), generation=False)
        return TrainingExample(
            encoded.input_ids, encoded.labels, self.pixel_values(image), checked[encoded.box_order]
        )

    def collate(self, examples: Sequence[TrainingExample], max_length: int | None = None) -> dict:
        """A right-padded batch; padding carries no loss and no attention."""
        longest = max(len(example.input_ids) for example in examples)
        if max_length is not None and longest > max_length:
            raise ValueError(f"a training example has {longest} tokens, more than max_length {max_length}")
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example.input_ids)
            input_ids[row, :length] = torch.tensor(example.input_ids)
            labels[row, :length] = torch.tensor(example.labels)
            attention_mask[row, :length] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack([example.pixel_values for example in examples]),
            "boxes": [example.boxes for example in examples],
        }
