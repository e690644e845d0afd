"""Florence-2 as a region model (roi_model.region_model): a box is four location tokens
`<loc_x1><loc_y1><loc_x2><loc_y2>`, each coordinate quantized to 1000 bins of the image's width or height
(floor(x * 1000), clamped to 0..999, as Florence2PostProcessor.quantize does).

Florence-2 answers task prompts, not free questions: the region-caption task `<REGION_TO_DESCRIPTION>`
reads "What does the region <loc_..>x4 describe?". A question that is exactly
`<REGION_TO_DESCRIPTION><region1>` becomes that prompt; any other question is passed as text with each
`<regionK>` replaced by its location tokens. The encoder input is laid out as the processor does:
image tokens, <s>, prompt, </s>. Each question is answered by the model's own `generate` (greedy unless
sampling is asked); the image is preprocessed once per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor

from roi_contract.records import TrainingRecord

from .engine import ImageRequest
from .generation import Answer, GenerationOptions
from .loading import resolve_device, resolve_dtype
from .processing import check_boxes
from .qwen_vl import IGNORE_INDEX, expand_regions_with
from .region_model import TrainingExample

BINS = 1000
REGION_TASK = "<REGION_TO_DESCRIPTION>"
REGION_PROMPT = "What does the region {input} describe?"


def location_bins(box: Sequence[float]) -> list[int]:
    return [min(max(int(value * BINS), 0), BINS - 1) for value in box]


def bins_to_box(bins: Sequence[int]) -> list[float]:
    """The centre of each bin, in 0..1 (Florence2PostProcessor.dequantize)."""
    return [(value + 0.5) / BINS for value in bins]


def location_text(box: Sequence[float]) -> str:
    return "".join(f"<loc_{value}>" for value in location_bins(box))


class FlorenceRegionModel:
    family = "florence2"

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.answered = 0

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device=None, dtype=None) -> FlorenceRegionModel:
        from transformers import Florence2ForConditionalGeneration

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model = Florence2ForConditionalGeneration.from_pretrained(
            directory,
            dtype=dtype,
            local_files_only=True,
            device_map={"": device} if device.type == "cuda" else None,
        )
        return cls(model, AutoProcessor.from_pretrained(directory, local_files_only=True))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def stats(self) -> dict:
        return {"family": self.family, "questions_answered": self.answered}

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    def prompt(self, question: str, boxes: Sequence[Sequence[float]]) -> str:
        """The text after the image tokens: <s>, the prompt, </s>."""
        text = expand_regions_with(question, [location_text(box) for box in boxes])
        if text.startswith(REGION_TASK):
            text = REGION_PROMPT.format(input=text[len(REGION_TASK) :].strip())
        return self.tokenizer.bos_token + text + self.tokenizer.eos_token

    def _inputs(self, question: str, boxes, pixel_values: torch.Tensor) -> dict:
        text = self.processor.image_token * self.processor.num_image_tokens + self.prompt(question, boxes)
        input_ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": torch.ones_like(input_ids).to(self.device),
            "pixel_values": pixel_values.to(self.device, self.model.dtype),
        }

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        return self.processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")[
            "pixel_values"
        ]

    def eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return [self.tokenizer.eos_token_id] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @torch.inference_mode()
    def answer(self, requests: Sequence[ImageRequest], *, remember: bool = True) -> list[list[Answer]]:
        del remember  # nothing is cached between calls
        for request in requests:
            for query in request.queries:
                check_boxes(query.boxes)
                expand_regions_with(query.question, ["x"] * len(query.boxes))
        results = []
        for request in requests:
            pixels = self.pixel_values(request.image)
            results.append([self._answer_one(query, pixels, request.options) for query in request.queries])
        return results

    def _answer_one(self, query, pixels, options: GenerationOptions) -> Answer:
        from .qwen_vl import answer_from_output

        inputs = self._inputs(query.question, query.boxes, pixels)
        eos_ids = self.eos_ids()
        sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
        output = self.model.generate(
            **inputs,
            max_new_tokens=options.max_new_tokens,
            eos_token_id=eos_ids,
            output_scores=True,
            return_dict_in_generate=True,
            **(sampling if options.do_sample else {"do_sample": False}),
        )
        self.answered += 1
        start = self.model.generation_config.decoder_start_token_id
        skip = 1 if start is not None and output.sequences[0, 0].item() == start else 0
        return answer_from_output(self.tokenizer, output, skip, eos_ids)

    def training_examples(self, record: TrainingRecord, image: Image.Image) -> list[TrainingExample]:
        pixels = self.pixel_values(image)
        boxes = [
            [x1 / record.width, y1 / record.height, x2 / record.width, y2 / record.height]
            for x1, y1, x2, y2 in record.regions
        ]
        examples = []
        turns = record.conversations
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            inputs = {key: value.cpu() for key, value in self._inputs(human.value, boxes, pixels).items()}
            labels = self.tokenizer(
                self.tokenizer.bos_token + gpt.value + self.tokenizer.eos_token,
                add_special_tokens=False,
                return_tensors="pt",
            )["input_ids"]
            labels[labels == self.tokenizer.pad_token_id] = IGNORE_INDEX
            examples.append(TrainingExample(inputs=inputs, labels=labels))
        return examples
