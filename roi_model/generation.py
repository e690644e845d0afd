"""Answering one question about some boxes: the plain path.

Vision tower, full prefill and Hugging Face `generate`, for one question on its own — what
GPT4RoI's demo does for every question. It is the reference the fast engine must reproduce
token for token, and the simplest way to use a model from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from .modeling import RegionLLMForCausalLM
from .processing import Box, RegionProcessor, check_boxes


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] | None = None  # None: the model's own (config.stop_strings)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("sampling needs a temperature above 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class Answer:
    text: str
    score: float  # mean log-probability of the generated tokens (stop marker included)
    token_ids: list[int] = field(default_factory=list)


def eos_token_ids(model: RegionLLMForCausalLM) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def stop_strings_for(model: RegionLLMForCausalLM, options: GenerationOptions) -> list[str]:
    return list(options.stop_strings if options.stop_strings is not None else model.config.stop_strings)


class StopOnText(StoppingCriteria):
    """Stop a row once the text of its last tokens contains one of its stop strings.

    Decoding the tail works with any tokenizer; transformers' own StopStringCriteria needs one that
    can spell arbitrary strings, which a word-level vocabulary cannot. `stop_strings` holds one list
    per row, or a single list for every row.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[Sequence[str]]):
        self.tokenizer = tokenizer
        self.stop_strings = [list(stops) for stops in stop_strings]
        longest = max((len(stop) for stops in self.stop_strings for stop in stops), default=0)
        self.tail = longest + 2  # every token spells at least one character

    def __call__(
        self, input_ids: torch.Tensor, scores=None, rows: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """`rows[i]` says whose stop strings apply to input row i (default: row i, or the single list)."""
        texts = self.tokenizer.batch_decode(input_ids[:, -self.tail :])
        if rows is None:
            rows = (
                torch.arange(len(texts))
                if len(self.stop_strings) > 1
                else torch.zeros(len(texts), dtype=torch.long)
            )
        done = [
            any(stop in text for stop in self.stop_strings[row])
            for row, text in zip(rows.tolist(), texts, strict=True)
        ]
        return torch.tensor(done, device=input_ids.device)


def finished_length(token_ids: Sequence[int], eos_ids: Sequence[int]) -> int:
    """Length of the answer up to and including its first end-of-sequence token."""
    for position, token in enumerate(token_ids):
        if token in eos_ids:
            return position + 1
    return len(token_ids)


@torch.inference_mode()
def generate_answer(
    model: RegionLLMForCausalLM,
    processor: RegionProcessor,
    image: Image.Image,
    boxes: Sequence[Box],
    question: str,
    options: GenerationOptions = GenerationOptions(),
) -> Answer:
    boxes_tensor = check_boxes(boxes)
    encoded = processor.encode([("user", question)], len(boxes_tensor), generation=True)
    device = model.device
    input_ids = torch.tensor([encoded.input_ids], device=device)
    features = model.get_image_features(processor.pixel_values(image)[None].to(device))
    region_tokens = None
    if encoded.box_order:
        region_tokens = model.get_region_features(features.pyramid, [boxes_tensor[encoded.box_order]])
    inputs_embeds = model.embed_inputs(input_ids, features.tokens, region_tokens)

    stop_strings = stop_strings_for(model, options)
    sampling = dict(temperature=options.temperature, top_p=options.top_p) if options.do_sample else {}
    output = model.language_model.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        stopping_criteria=StoppingCriteriaList(
            [StopOnText(processor.tokenizer, [stop_strings])] if stop_strings else []
        ),
        eos_token_id=eos_token_ids(model) or None,
        pad_token_id=processor.tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
        **sampling,
    )
    log_probs = model.language_model.compute_transition_scores(
        output.sequences, output.logits, normalize_logits=True
    )[0]
    token_ids = output.sequences[0, -log_probs.shape[0] :].tolist()
    length = finished_length(token_ids, eos_token_ids(model))
    return Answer(
        text=processor.clean_answer(token_ids[:length], stop_strings),
        score=float(log_probs[:length].float().mean()),
        token_ids=token_ids[:length],
    )
