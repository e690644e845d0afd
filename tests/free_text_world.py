"""The synthetic world with free-text captions: each caption written one of several ways (synonyms, word
orders, optional details), as annotators write them, so that exact match says nothing about a caption.

`free_text_world(out, images, seed)` writes the world (roi_model.synthetic.generate_world) and rewrites
its caption answers; `paraphrase(objects, rng)` is one way of writing a caption. `ScriptedModel` stands in
for a RegionEngine in tests of the metrics and the gate: it answers each question with a function of the
ground truth of the regions asked about.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from roi_model.synthetic import generate_world
from roi_model.training import question_rows, read_records

SYNONYMS = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "square shape"),
    "triangle": ("triangle", "triangular shape"),
    "diamond": ("diamond", "rhombus", "diamond shape"),
}
TEMPLATES = (
    "a {size} {colour} {shape}",
    "{colour} {shape}, {size}",
    "the {shape} is {colour} and {size}",
    "a {size} {shape} coloured {colour}",
    "a {colour} {shape}",  # the size left out
    "{size} {colour} {shape} on a plain background",  # a detail added
    "there is a {colour} {shape} here",
)
CAPTION_QUESTION = "Describe <region1> briefly."


def paraphrase(objects: dict[str, str], rng: random.Random) -> str:
    words = {key: rng.choice(SYNONYMS.get(value, (value,))) for key, value in objects.items()}
    return rng.choice(TEMPLATES).format(**words)


def free_text_world(out: Path, images: int, seed: int, *, caption_share: float = 0.5) -> Path:
    """Write the world and return its data.jsonl, whose caption answers are paraphrases."""
    weights = {"caption": caption_share, "colour": 0.1, "shape": 0.1, "size": 0.1, "left": 0.1, "larger": 0.1}
    generate_world(out, images, seed, kind_weights=weights)
    data = out / "data.jsonl"
    rng = random.Random(seed)
    lines = []
    for line in data.read_text().splitlines():
        record = json.loads(line)
        for question, answer in zip(record["conversations"][::2], record["conversations"][1::2], strict=True):
            if question.get("kind") == "caption":
                region = int(question["value"].split("<region")[1].split(">")[0]) - 1
                answer["value"] = paraphrase(record["objects"][region], rng)
        lines.append(json.dumps(record))
    data.write_text("".join(line + "\n" for line in lines))
    return data


Answerer = Callable[[str, list[dict], str], str]  # (kind, objects asked about, reference) -> answer


@dataclass
class _Answer:
    text: str
    score: float = 0.0


class ScriptedModel:
    """Answers evaluate_records' questions in the order it asks them (records in order, each question on
    its own) with `answer(kind, objects, reference)`."""

    def __init__(self, records: list[dict], answer: Answerer) -> None:
        self._queue = [
            answer(kind, [record["objects"][index] for index in regions], turns[1][1])
            for record in records
            for turns, regions, kind in question_rows(record, split=True)
        ]

    def answer(self, requests, *, remember: bool = True) -> list[list[_Answer]]:
        results = []
        for request in requests:
            results.append([_Answer(self._queue.pop(0)) for _ in request.queries])
        return results


def read(data: Path) -> list[dict]:
    return read_records([data])
