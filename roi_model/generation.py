"""Answering one question about some boxes: the plain path.

Vision tower, full prefill and the model's own `generate`, for one question on its own — what
GPT4RoI's demo does for every question. It is the reference the fast engine must reproduce
token for token, and the simplest way to use a model from Python.

Our default is greedy decoding of up to 48 new tokens (pre-labels should not change from one run to
the next); GPT4RoI's demo samples at temperature 0.2 with up to 1024 (its model card in a converted
directory says so). An answer that max_new_tokens cut off before the model stopped says so
(`Answer.truncated`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from roi_contract.describe import DEFAULT_MAX_NEW_TOKENS

from .modeling import RegionLLMForCausalLM
from .processing import Box, RegionProcessor, check_boxes


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
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
    truncated: bool = False  # max_new_tokens ended it before an end-of-sequence token or a stop string


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


def build_answer(
    processor: RegionProcessor,
    token_ids: Sequence[int],
    log_probs: torch.Tensor,
    eos_ids: Sequence[int],
    stop_strings: Sequence[str],
) -> Answer:
    """The answer of one generated sequence: cut at its end-of-sequence token, scored, and marked
    truncated when neither that token nor a stop string ended it."""
    length = finished_length(token_ids, eos_ids)
    text = processor.tokenizer.decode(token_ids[:length])  # as StopOnText reads it
    finished = any(token in eos_ids for token in token_ids) or any(stop in text for stop in stop_strings)
    return Answer(
        text=processor.clean_answer(token_ids[:length], stop_strings),
        score=float(log_probs[:length].float().mean()),
        token_ids=list(token_ids[:length]),
        truncated=not finished,
    )


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
    stop_strings = stop_strings_for(model, options)
    eos_ids = eos_token_ids(model)
    settings = GenerationConfig(  # every field the model's own generation config might set otherwise
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=0,
        eos_token_id=eos_ids or None,
        pad_token_id=processor.tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    output = model.generate(
        input_ids=input_ids,
        pixel_values=processor.pixel_values(image)[None].to(device),
        boxes=[boxes_tensor[encoded.box_order]],
        attention_mask=torch.ones_like(input_ids),
        generation_config=settings,
        stopping_criteria=StoppingCriteriaList(
            [StopOnText(processor.tokenizer, [stop_strings])] if stop_strings else []
        ),
    )
    log_probs = model.compute_transition_scores(output.sequences, output.logits, normalize_logits=True)[0]
    token_ids = output.sequences[0, input_ids.shape[1] :].tolist()
    return build_answer(processor, token_ids, log_probs, eos_ids, stop_strings)
