"""Qwen2.5-VL and Qwen3-VL as region models (roi_model.region_model): a box is written into the prompt as
coordinates, in each model's own grounding convention.

- Qwen2.5-VL grounds in absolute pixels of the image as the model sees it: resized by the image processor's
  smart_resize (sides multiples of patch_size * merge_size, area within min/max pixels). A box in 0..1 of
  the displayed image becomes [x1, y1, x2, y2] in pixels of that resized image.
- Qwen3-VL grounds on a 0-1000 grid relative to the image, whatever its resolution.

`<regionK>` in a question becomes "the region [x1, y1, x2, y2]". The image is preprocessed once per
request (pixel values and grid); each question is answered by the model's own `generate`, greedy unless
the options sample, so answers are those of the plain path. (The region-LLM engine's shared-prefix KV
reuse is not implemented for these families yet.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor

from roi_contract.describe import REGION_REFERENCE
from roi_contract.records import TrainingRecord

from .engine import ImageRequest
from .generation import Answer, GenerationOptions
from .loading import resolve_device, resolve_dtype
from .processing import check_boxes
from .region_model import TrainingExample

IGNORE_INDEX = -100
SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
GRID = 1000  # Qwen3-VL's relative coordinate grid


def model_class(family: str):
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
    if family == "qwen3_vl":
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration
    raise ValueError(f"not a Qwen-VL family: {family!r}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size the Qwen2-VL image processor resizes an image to (its own function, for the box mapping)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as resize

    return resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def resized_size(image_processor, width: int, height: int) -> tuple[int, int]:
    """(width, height) of the image as the model sees it."""
    size = image_processor.size or {}
    min_pixels = size.get("shortest_edge") or getattr(image_processor, "min_pixels", None) or 56 * 56
    max_pixels = size.get("longest_edge") or getattr(image_processor, "max_pixels", None) or 28 * 28 * 1280
    factor = image_processor.patch_size * image_processor.merge_size
    resized_height, resized_width = smart_resize(height, width, factor, min_pixels, max_pixels)
    return resized_width, resized_height


def box_coordinates(family: str, box: Sequence[float], resized: tuple[int, int]) -> list[int]:
    """A 0..1 box as the family writes it: pixels of the resized image (Qwen2.5-VL) or 0-1000 (Qwen3-VL)."""
    x1, y1, x2, y2 = box
    if family == "qwen2_5_vl":
        width, height = resized
        scale = (width, height, width, height)
    else:
        scale = (GRID, GRID, GRID, GRID)
    return [
        min(max(round(value * side), 0), side) for value, side in zip((x1, y1, x2, y2), scale, strict=True)
    ]


def coordinates_to_box(family: str, coordinates: Sequence[int], resized: tuple[int, int]) -> list[float]:
    """The inverse of box_coordinates, to 0..1 of the displayed image."""
    if family == "qwen2_5_vl":
        width, height = resized
        return [
            coordinates[0] / width,
            coordinates[1] / height,
            coordinates[2] / width,
            coordinates[3] / height,
        ]
    return [value / GRID for value in coordinates]


def region_text(coordinates: Sequence[int]) -> str:
    return "the region [" + ", ".join(str(value) for value in coordinates) + "]"


def expand_regions_with(question: str, texts: Sequence[str]) -> str:
    """`<regionK>` replaced by texts[K-1]; ValueError for a K without a box."""

    def rewrite(match) -> str:
        number = int(match.group(1))
        if not 1 <= number <= len(texts):
            raise ValueError(f"the question mentions <region{number}>, but has {len(texts)} box(es)")
        return texts[number - 1]

    return REGION_REFERENCE.sub(rewrite, question)


def expand_regions(question: str, coordinates: Sequence[Sequence[int]]) -> str:
    return expand_regions_with(question, [region_text(values) for values in coordinates])


def answer_from_output(tokenizer, output, prompt_length: int, eos_ids: list[int]) -> Answer:
    """The answer of a `generate(..., output_scores=True, return_dict_in_generate=True)` of one sequence."""
    tokens = output.sequences[0, prompt_length:].tolist()
    log_probs = [
        float(torch.log_softmax(scores[0].float(), dim=-1)[token])
        for scores, token in zip(output.scores, tokens, strict=True)
    ]
    length = next((i + 1 for i, token in enumerate(tokens) if token in eos_ids), len(tokens))
    finished = bool(tokens) and tokens[length - 1] in eos_ids
    text = tokenizer.decode(tokens[:length], skip_special_tokens=True).strip()
    score = sum(log_probs[:length]) / max(length, 1)
    return Answer(text=text, score=min(score, 0.0), token_ids=tokens[:length], truncated=not finished)


class QwenVLRegionModel:
    def __init__(self, model, processor, family: str):
        self.model = model.eval()
        self.processor = processor
        self.family = family
        self.tokenizer = processor.tokenizer
        self.answered = 0
        self.images_encoded = 0

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device=None, dtype=None) -> QwenVLRegionModel:
        from .families import detect_family

        family = detect_family(directory)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model = model_class(family).from_pretrained(
            directory,
            dtype=dtype,
            local_files_only=True,
            device_map={"": device} if device.type == "cuda" else None,
        )
        processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
        return cls(model, processor, family)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def stats(self) -> dict:
        return {
            "family": self.family,
            "questions_answered": self.answered,
            "images_encoded": self.images_encoded,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    # prompts ----------------------------------------------------------------------------------------
    def encode_image(self, image: Image.Image) -> dict:
        """Pixel values and grid of the image, and its size as the model sees it."""
        image = image.convert("RGB")
        features = self.processor.image_processor(images=[image], return_tensors="pt")
        self.images_encoded += 1
        return {
            "pixel_values": features["pixel_values"],
            "image_grid_thw": features["image_grid_thw"],
            "resized": resized_size(self.processor.image_processor, image.width, image.height),
        }

    def image_token_count(self, encoded: dict) -> int:
        return int(encoded["image_grid_thw"][0].prod()) // self.processor.image_processor.merge_size**2

    def prompt(self, question: str, boxes: Sequence[Sequence[float]], encoded: dict) -> str:
        """The chat prompt of one question, image tokens expanded, up to the assistant's answer."""
        coordinates = [box_coordinates(self.family, box, encoded["resized"]) for box in boxes]
        text = expand_regions(question, coordinates)
        image = VISION_START + IMAGE_PAD * self.image_token_count(encoded) + VISION_END
        return (
            f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
            f"{IM_START}user\n{image}{text}{IM_END}\n"
            f"{IM_START}assistant\n"
        )

    def _inputs(self, text: str, encoded: dict) -> dict:
        input_ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return self._model_inputs(input_ids, encoded)

    def _model_inputs(self, input_ids: torch.Tensor, encoded: dict) -> dict:
        image_token_id = self.model.config.image_token_id
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": torch.ones_like(input_ids).to(self.device),
            # 1 marks image tokens: the multimodal RoPE positions them on the image grid
            "mm_token_type_ids": (input_ids == image_token_id).long().to(self.device),
            "pixel_values": encoded["pixel_values"].to(self.device, self.model.dtype),
            "image_grid_thw": encoded["image_grid_thw"].to(self.device),
        }

    # answering ----------------------------------------------------------------------------------------
    def eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        im_end = self.tokenizer.convert_tokens_to_ids(IM_END)
        return ids if im_end is None or im_end in ids else [*ids, im_end]

    @torch.inference_mode()
    def answer(self, requests: Sequence[ImageRequest], *, remember: bool = True) -> list[list[Answer]]:
        del remember  # nothing is cached between calls
        for request in requests:  # bad input raises before any work
            for query in request.queries:
                check_boxes(query.boxes)
                expand_regions(query.question, [[0, 0, 1, 1]] * len(query.boxes))
        results = []
        for request in requests:
            encoded = self.encode_image(request.image)
            results.append([self._answer_one(query, encoded, request.options) for query in request.queries])
        return results

    def _answer_one(self, query, encoded: dict, options: GenerationOptions) -> Answer:
        inputs = self._inputs(self.prompt(query.question, query.boxes, encoded), encoded)
        eos_ids = self.eos_ids()
        sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
        output = self.model.generate(
            **inputs,
            max_new_tokens=options.max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else eos_ids[0],
            output_scores=True,
            return_dict_in_generate=True,
            **(sampling if options.do_sample else {"do_sample": False}),
        )
        self.answered += 1
        return self.build_answer(output, inputs["input_ids"].shape[1], eos_ids)

    def build_answer(self, output, prompt_length: int, eos_ids: list[int]) -> Answer:
        return answer_from_output(self.tokenizer, output, prompt_length, eos_ids)

    # training ---------------------------------------------------------------------------------------
    def training_examples(self, record: TrainingRecord, image: Image.Image) -> list[TrainingExample]:
        encoded = self.encode_image(image)
        boxes = [
            [x1 / record.width, y1 / record.height, x2 / record.width, y2 / record.height]
            for x1, y1, x2, y2 in record.regions
        ]
        examples = []
        turns = record.conversations
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            prompt = self.prompt(human.value, boxes, encoded)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = self.tokenizer(gpt.value + IM_END, add_special_tokens=False)["input_ids"]
            input_ids = torch.tensor([prompt_ids + answer_ids])
            labels = torch.tensor([[IGNORE_INDEX] * len(prompt_ids) + answer_ids])
            inputs = {key: value.cpu() for key, value in self._model_inputs(input_ids, encoded).items()}
            examples.append(TrainingExample(inputs=inputs, labels=labels))
        return examples
