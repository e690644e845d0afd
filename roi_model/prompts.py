"""Prompts: `<regionK>` references and the two conversation templates.

A conversation is rendered into text segments, each marked as a training target or not, so
that one tokenization (with character offsets) gives both the input ids and the loss mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from roi_contract.describe import REGION_REFERENCE

from .configuration import BBOX_TOKEN, IMAGE_END_TOKEN, IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN

# `<regionK>`, or GPT4RoI's shorthand `<K>`: both name box K
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Segment:
    text: str
    target: bool


def expand_region_references(
    texts: list[str], num_boxes: int, binding: str = "by_number"
) -> tuple[list[str], list[int]]:
    """GPT4RoI's rewrite: `<regionK>` (or `<K>`) becomes "regionK <bbox>" at its first mention and "regionK"
    later, as GPT4RoI's demo writes a name from an earlier round.

    Returns the rewritten texts and, for each `<bbox>` in order of appearance, the index of its box:
    box K-1 for the first mention of K ("by_number"), or box k-1 for the k-th `<bbox>` ("by_position",
    GPT4RoI's rule: `Is <region2> left of <region1>?` gives the first drawn box to region2's `<bbox>`).
    Every box must be referenced and every reference must name a box.
    """
    mentioned: list[int] = []

    def rewrite(match: re.Match) -> str:
        number = int(match.group(1))
        if not 1 <= number <= num_boxes:
            given = f"only {num_boxes} box{'es' if num_boxes != 1 else ''} given"
            raise ValueError(f"<region{number}> refers to box {number}, but {given}")
        if number - 1 in mentioned:
            return f"region{number}"
        mentioned.append(number - 1)
        return f"region{number} {BBOX_TOKEN}"

    rewritten = [REGION_REFERENCE.sub(rewrite, text) for text in texts]
    unreferenced = sorted(set(range(num_boxes)) - set(mentioned))
    if unreferenced:
        box = unreferenced[0] + 1
        raise ValueError(f"box {box} is never referenced: mention it as <region{box}>")
    return rewritten, (mentioned if binding == "by_number" else list(range(num_boxes)))


def image_token_text(num_tokens: int) -> str:
    return IMAGE_START_TOKEN + IMAGE_PATCH_TOKEN * num_tokens + IMAGE_END_TOKEN


class GPT4RoIV0Template:
    """The LLaVA-v0 "###" conversation GPT4RoI was trained with.

    Training text: "{system}\\n\\n### Human: {q}\\n### Assistant: {a}\\n### ...". The loss covers each
    "### Assistant: {a}\\n" and the "###" that follows it (that is how the model learns to stop). A
    generation prompt ends with "### ", and the model writes "Assistant: ..." itself.
    """

    add_special_tokens = True  # the tokenizer's BOS, as the original preprocessing had

    def __init__(self, system_prompt: str):
        self.system_prompt = system_prompt

    def segments(self, turns: list[tuple[str, str]], *, generation: bool) -> list[Segment]:
        segments = [Segment(self.system_prompt + "\n\n", False)]
        after_answer = False  # an answer ends with the "###" that opens the next turn
        for role, text in turns:
            if role == "user":
                segments.append(Segment((" " if after_answer else "### ") + f"Human: {text}\n", False))
                after_answer = False
            else:
                segments += [Segment(f"### Assistant: {text}\n", True), Segment("###", True)]
                after_answer = True
        if generation:
            segments.append(Segment(" " if after_answer else "### ", False))
        return segments

    def clean_answer(self, text: str) -> str:
        return text.strip().removeprefix("Assistant:").strip()


class ChatTemplate:
    """The tokenizer's own chat template (modern bases).

    The spans that each assistant message adds to the rendered text, end-of-turn marker included,
    are the targets. Rendering grows the conversation one message at a time and takes differences,
    which works for any template that only appends.
    """

    add_special_tokens = False  # chat templates write their own BOS

    def __init__(self, tokenizer, system_prompt: str):
        if tokenizer.chat_template is None:
            raise ValueError("template 'chat' needs a tokenizer with a chat_template")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def segments(self, turns: list[tuple[str, str]], *, generation: bool) -> list[Segment]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        segments, rendered = [], ""
        for role, text in turns:
            messages.append({"role": role, "content": text})
            is_user = role == "user"
            grown = self._render(messages, generation_prompt=is_user)
            if not grown.startswith(rendered):
                raise ValueError(
                    "the chat template rewrites earlier turns; its assistant spans cannot be found"
                )
            segments.append(Segment(grown[len(rendered) :], not is_user))
            rendered = grown
        if generation and turns and turns[-1][0] != "user":
            raise ValueError("a generation prompt must end with a user turn")
        return segments

    def clean_answer(self, text: str) -> str:
        return text.strip()
