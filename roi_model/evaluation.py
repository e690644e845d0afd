"""Evaluation on held-out spatial-instruction records: exact match and token-F1, overall and per
question kind, the captioning metrics for free-text kinds (roi_model/text_metrics.py), plus a
per-attribute confusion summary of the captions.

Every question is asked on its own, with its regions renumbered from 1 — the way the backend asks.
"""

from __future__ import annotations

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
from .text_metrics import normalize, score_pairs, token_f1
from .training import normalized_boxes, question_rows, read_records

__all__ = ["caption_confusion", "evaluate", "evaluate_records", "normalize", "token_f1"]


def _score(pairs: Sequence[tuple[str, str]]) -> dict:
    return score_pairs(None, pairs)


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
    engine: RegionModel,
    records: list[dict],
    *,
    images_per_batch: int = 16,
    max_new_tokens: int = 16,
    java: bool | None = None,
) -> dict:
    """Scores overall and per kind; `java`: see text_metrics.score_pairs."""
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
        "per_kind": {kind: score_pairs(kind, pairs, java=java) for kind, pairs in sorted(by_kind.items())},
        "captions": caption_confusion(captions) if captions else {},
        "examples_wrong": [
            {"kind": kind, "prediction": p, "reference": r}
            for kind, p, r in asked
            if normalize(p) != normalize(r)
        ][:10],
    }


def evaluate(
    model_dir: Path,
    data: Path,
    *,
    device: str | None = None,
    limit: int | None = None,
    java: bool | None = None,
) -> dict:
    engine = load_region_model(model_dir, device=device)
    records = read_records([data])[:limit]
    return evaluate_records(engine, records, java=java)
