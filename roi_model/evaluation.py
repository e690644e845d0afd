"""Evaluation on held-out spatial-instruction records: exact match and token-F1, overall and per
question kind, plus a per-attribute confusion summary of the captions.

Every question is asked on its own, with its regions renumbered from 1 — the way the backend asks.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .engine import ImageRequest, RegionQuery
from .families import load_region_model
from .generation import GenerationOptions
from .processing import load_image
from .region_model import RegionModel
from .synthetic import ATTRIBUTES, parse_caption
from .training import normalized_boxes, question_rows, read_records

WORD = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    return " ".join(WORD.findall(text.lower()))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or not common:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _score(pairs: Sequence[tuple[str, str]]) -> dict:
    return {
        "questions": len(pairs),
        "exact_match": round(sum(normalize(p) == normalize(r) for p, r in pairs) / max(len(pairs), 1), 4),
        "token_f1": round(sum(token_f1(p, r) for p, r in pairs) / max(len(pairs), 1), 4),
    }


def caption_confusion(pairs: Sequence[tuple[str, str]]) -> dict:
    """Per attribute: accuracy, and counts of reference value -> predicted value ("?" when unparsable)."""
    summary = {}
    for attribute in ATTRIBUTES:
        confusion: dict[str, Counter] = defaultdict(Counter)
        for prediction, reference in pairs:
            expected = parse_caption(reference)
            if expected is None:
                continue
            predicted = parse_caption(prediction) or {}
            confusion[expected[attribute]][predicted.get(attribute, "?")] += 1
        total = sum(sum(row.values()) for row in confusion.values())
        correct = sum(row[value] for value, row in confusion.items())
        summary[attribute] = {
            "accuracy": round(correct / total, 4) if total else None,
            "confusion": {value: dict(row) for value, row in sorted(confusion.items())},
        }
    return summary


def evaluate_records(
    engine: RegionModel, records: list[dict], *, images_per_batch: int = 16, max_new_tokens: int = 16
) -> dict:
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    asked: list[tuple[str | None, str, str]] = []  # (kind, prediction, reference)
    for start in tqdm(range(0, len(records), images_per_batch), desc="evaluating", unit="batch", leave=False):
        batch = records[start : start + images_per_batch]
        requests, references = [], []
        for record in batch:
            boxes = normalized_boxes(record)
            queries = []
            for turns, regions, kind in question_rows(record, split=True):
                queries.append(RegionQuery(turns[0][1], [boxes[index] for index in regions]))
                references.append((kind, turns[1][1]))
            requests.append(
                ImageRequest(load_image(Path(record["_root"]) / record["image"]), queries, options)
            )
        answers = [answer for image_answers in engine.answer(requests) for answer in image_answers]
        asked += [
            (kind, answer.text, reference)
            for (kind, reference), answer in zip(references, answers, strict=True)
        ]

    by_kind: dict[str, list] = defaultdict(list)
    for kind, prediction, reference in asked:
        by_kind[kind or "unknown"].append((prediction, reference))
    captions = by_kind.get("caption", [])
    return {
        **_score([(p, r) for _, p, r in asked]),
        "per_kind": {kind: _score(pairs) for kind, pairs in sorted(by_kind.items())},
        "captions": caption_confusion(captions) if captions else {},
        "examples_wrong": [
            {"kind": kind, "prediction": p, "reference": r}
            for kind, p, r in asked
            if normalize(p) != normalize(r)
        ][:10],
    }


def evaluate(model_dir: Path, data: Path, *, device: str | None = None, limit: int | None = None) -> dict:
    engine = load_region_model(model_dir, device=device)
    records = read_records([data])[:limit]
    return evaluate_records(engine, records)
