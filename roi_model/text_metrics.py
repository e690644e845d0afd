"""Scores of answers against references, by question kind (no torch, no model).

Short answers and choices (classification, the synthetic world's colour / shape / size / left / larger)
are judged by exact match. Free text (caption, region_qa, reasoning) also gets the region-captioning
metrics as the captioning papers compute them, with pycocoevalcap, their reference implementation:
BLEU-4, METEOR, ROUGE-L and CIDEr-D, plus token-F1. Tokenization is pycocoevalcap's PTB tokenizer and
METEOR its jar, both of which need a Java runtime: without one the text is tokenized by `normalize` and
METEOR is None, and the scores say so ("tokenizer": "simple", "meteor_unavailable").

The gate compares one metric per kind (`GATE_METRICS`, overridable in the project's training settings):
exact match for short answers, CIDEr-D for free text (two free-text captions of a region almost never
match exactly, so exact match would score every model about 0).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections import Counter
from collections.abc import Sequence

WORD = re.compile(r"[a-z0-9]+")
FREE_TEXT_KINDS = ("caption", "region_qa", "reasoning")
FREE_TEXT_METRICS = ("bleu4", "meteor", "rouge_l", "cider_d")
METRIC_NAMES = ("exact_match", "token_f1", *FREE_TEXT_METRICS)


def normalize(text: str) -> str:
    return " ".join(WORD.findall(text.lower()))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or not common:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def is_free_text(kind: str | None) -> bool:
    return kind in FREE_TEXT_KINDS


def gate_metric(kind: str | None, overrides: dict[str, str] | None = None) -> str:
    """The metric the gate compares for a kind: the project's choice, else CIDEr-D or exact match."""
    if overrides and kind in overrides:
        return overrides[kind]
    return "cider_d" if is_free_text(kind) else "exact_match"


def java_available() -> bool:
    return shutil.which("java") is not None


def score_pairs(kind: str | None, pairs: Sequence[tuple[str, str]], *, java: bool | None = None) -> dict:
    """{"questions", "exact_match", "token_f1"} and, for a free-text kind, the captioning metrics
    (`java`: use the Java runtime for PTB tokenization and METEOR; default: when one is on PATH)."""
    count = max(len(pairs), 1)
    scores: dict = {
        "questions": len(pairs),
        "exact_match": round(sum(normalize(p) == normalize(r) for p, r in pairs) / count, 4),
        "token_f1": round(sum(token_f1(p, r) for p, r in pairs) / count, 4),
    }
    if is_free_text(kind) and pairs:
        scores.update(captioning_metrics(pairs, java=java))
    return scores


def captioning_metrics(pairs: Sequence[tuple[str, str]], *, java: bool | None = None) -> dict:
    """BLEU-4, METEOR, ROUGE-L and CIDEr-D of predictions against one reference each (pycocoevalcap)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java = java_available() if java is None else java
    predictions = {index: [prediction] for index, (prediction, _) in enumerate(pairs)}
    references = {index: [reference] for index, (_, reference) in enumerate(pairs)}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        as_captions = {index: [{"caption": text} for text in texts] for index, texts in predictions.items()}
        predictions = tokenizer.tokenize(as_captions)
        references = tokenizer.tokenize(
            {index: [{"caption": text} for text in texts] for index, texts in references.items()}
        )
    else:
        predictions = {index: [normalize(text)] for index, [text] in predictions.items()}
        references = {index: [normalize(text)] for index, [text] in references.items()}
    # An empty prediction is a legitimate (bad) answer; BLEU's counter needs at least one token.
    predictions = {index: [text or "<empty>"] for index, [text] in predictions.items()}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its BLEU statistics
        bleu, _ = Bleu(4).compute_score(references, predictions)
    scores = {
        "bleu4": round(float(bleu[3]), 4),
        "rouge_l": round(float(Rouge().compute_score(references, predictions)[0]), 4),
        "cider_d": round(float(Cider().compute_score(references, predictions)[0]), 4),
        "tokenizer": "ptb" if java else "simple",
    }
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            scores["meteor"] = round(float(meteor.compute_score(references, predictions)[0]), 4)
        finally:
            with contextlib.suppress(Exception):
                meteor.close()
    else:
        scores["meteor"] = None
        scores["meteor_unavailable"] = "no Java runtime (java not on PATH): METEOR not computed"
    return scores


def metrics_table(per_kind: dict[str, dict]) -> str:
    """The per-kind scores as a text table; "-" where a metric does not apply, "n/a" where it was not
    computed (METEOR without Java), and the gate's metric of each kind marked with *."""
    header = ["kind", "questions", *METRIC_NAMES]
    rows = [header]
    for kind, scores in sorted(per_kind.items()):
        row = [kind, str(scores.get("questions", 0))]
        for metric in METRIC_NAMES:
            if metric not in scores:
                cell = "-"
            elif scores[metric] is None:
                cell = "n/a"
            else:
                cell = f"{scores[metric]:.4f}"
            row.append(cell + ("*" if metric == gate_metric(kind) else ""))
        rows.append(row)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    notes = {scores.get("meteor_unavailable") for scores in per_kind.values()} - {None}
    return "\n".join([*lines, *(f"note: {note}" for note in sorted(notes))])
