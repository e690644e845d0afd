"""The processor: images, boxes and conversations in; tensors the model takes out.

Images are EXIF-oriented, converted to RGB and stretched to the vision resolution (GPT4RoI
stretches too, so normalized boxes keep their meaning), in one bicubic resize or, for GPT4RoI's
checkpoints, as its demo does (config.image_resize). Boxes are normalized xyxy in 0..1 of the
displayed image. A conversation is rendered by the configured template and tokenized (as one text,
or cut at the added tokens as GPT4RoI's tokenizer did: config.tokenization); character offsets turn
the template's target segments into the loss mask.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from roi_contract.describe import checked_box
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

Box = Sequence[float]
Turn = tuple[str, str]  # ("user" | "assistant", text)


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    box_order: list[int]  # box index for each <bbox> token, in order


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
        try:
            checked.append(checked_box([float(value) for value in box]))
        except ValueError as error:  # the contract's rule, with the box's number in front
            raise ValueError(f"box {number} {list(box)}: {error}") from None
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
    def resize_image(self, image: Image.Image) -> torch.Tensor:
        """The first, 8-bit step of preprocessing, (3, H, W) uint8: worth caching (training keeps it per image).

        "stretch": bicubic to size x size. "shortest_edge_then_stretch": CLIPImageProcessor's resize, the
        shortest edge bicubic to `size` and the other edge to int(size * long / short); the stretch follows
        in `normalize_pixels`.
        """
        size = self.config.image_size
        if self.config.image_resize == "stretch":
            target = (size, size)
        else:
            short, long = sorted(image.size)
            scaled = int(size * long / short)
            target = (size, scaled) if image.width <= image.height else (scaled, size)
        return TF.pil_to_tensor(image.resize(target, Image.Resampling.BICUBIC))

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) from `resize_image` -> the normalized (3, size, size) float tensor the model takes."""
        tensor = TF.normalize(
            TF.to_dtype(pixels, torch.float32, scale=True), self.config.image_mean, self.config.image_std
        )
        size = self.config.image_size
        if tensor.shape[-2:] != (size, size):  # GPT4RoI's demo: bilinear on the normalized tensor
            tensor = F.interpolate(tensor[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        return tensor

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        return self.normalize_pixels(self.resize_image(image))

    # text -------------------------------------------------------------------------------------------
    def encode(self, turns: list[Turn], num_boxes: int, *, generation: bool) -> EncodedConversation:
        """Render and tokenize a conversation; the first user turn carries the image."""
        if not turns or turns[0][0] != "user":
            raise ValueError("a conversation must start with a user turn")
        user_texts = [text for role, text in turns if role == "user"]
        if not any(text.strip() for text in user_texts):
            raise ValueError("the question is empty")
        expanded, box_order = expand_region_references(user_texts, num_boxes, self.config.region_binding)
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

        input_ids, offsets = self.tokenize(text)
        labels = [
            token if any(start <= offset < end for start, end in target_spans) else IGNORE_INDEX
            for token, offset in zip(input_ids, offsets, strict=True)
        ]
        return EncodedConversation(input_ids, labels, box_order)

    def tokenize(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of a rendered conversation and the character offset where each token starts."""
        add_special_tokens = self.template.add_special_tokens
        if self.config.tokenization == "whole_text":
            encoding = self.tokenizer(
                text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
            )
            return encoding["input_ids"], [start for start, _ in encoding["offset_mapping"]]
        return split_at_added_tokens(self.tokenizer, text, add_bos=add_special_tokens)

    def clean_answer(self, token_ids: Sequence[int], stop_strings: Sequence[str] = ()) -> str:
        """The answer text: cut at the first stop string, without the template's role marker."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = min((text.find(stop) for stop in stop_strings if stop in text), default=len(text))
        return self.template.clean_answer(text[:cut])


def split_at_added_tokens(
    tokenizer: PreTrainedTokenizerBase, text: str, *, add_bos: bool
) -> tuple[list[int], list[int]]:
    """Tokenize as transformers 4.29's slow (SentencePiece) LLaMA tokenizer did, which GPT4RoI trained with.

    That tokenizer cut the text at every added token and encoded each piece on its own, so each piece gets
    SentencePiece's "▁" prefix ("<bbox>?" is "<bbox> ▁?"); the whitespace on both sides of a token added as
    a plain string (the image and box tokens) was dropped first ("The <im_start>" is "▁The <im_start>").
    The tokenizer's named special tokens (<s>, </s>, <unk>, the pad token) were AddedTokens that keep the
    whitespace around them. Returns the ids and the character offset where each token starts.
    """
    named = {
        str(token)
        for token in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token)
        if token is not None
    }
    added = sorted(
        {token.content for token in tokenizer.added_tokens_decoder.values()} | named, key=len, reverse=True
    )
    parts = re.split("(" + "|".join(map(re.escape, added)) + ")", text)  # text, token, text, ..., text
    pieces: list[list] = []  # [start, end, token or None]
    position = 0
    for index, part in enumerate(parts):
        pieces.append([position, position + len(part), part if index % 2 else None])
        position += len(part)
    for index in range(1, len(pieces), 2):
        if pieces[index][2] in named:
            continue
        before, after = pieces[index - 1], pieces[index + 1]
        before[1] = before[0] + len(text[before[0] : before[1]].rstrip())
        after[0] = after[1] - len(text[after[0] : after[1]].lstrip())

    ids = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    offsets = [0] * len(ids)
    for start, end, token in pieces:
        if token is not None:
            ids.append(tokenizer.convert_tokens_to_ids(token))
            offsets.append(start)
        elif end > start:
            encoding = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
            ids += encoding["input_ids"]
            offsets += [start + begin for begin, _ in encoding["offset_mapping"]]
    return ids, offsets
