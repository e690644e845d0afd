"""Which part of the region encoder gives the model its sense of location? (one JSON line)

Trains the demo model's recipe (roi_model/demo_model.py: the same worlds, question mix, steps and
learning rate) from scratch with parts of GPT4RoI's region encoder switched off, and evaluates each on
the demo model's held-out world:

- full: every part (three levels, scale-shuffle fusion, box position embedding); `--full-model
  models/demo` evaluates the shipped demo model instead of training it again (same recipe, same data);
- no_position: without the box position embedding;
- one_level: RoIAlign on the finest level only, instead of three;
- no_fusion: without the scale-shuffle fusion rounds;
- image_tokens_49: every part, but 49 global image tokens (the 7x7 stage) instead of 9.

Prints {"steps", "images", "variants": {name: {"caption", "relations", "attributes", "per_kind", "minutes"}}}.
Takes about 16 minutes per variant on 2 CPU cores (two variants side by side at one thread each: 19).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from roi_model.demo_model import (
    HELD_BACK,
    HELD_OUT_IMAGES,
    HELD_OUT_SEED,
    RECIPE,
    TRAIN_IMAGES,
    TRAIN_KIND_WEIGHTS,
    TRAIN_SEED,
)
from roi_model.evaluation import evaluate
from roi_model.synthetic import ATTRIBUTES, generate_world
from roi_model.training import TrainOptions, train

VARIANTS: dict[str, dict] = {
    "full": {},
    "no_position": {"use_region_position": False},
    "one_level": {"region_feature_layers": [1], "region_pyramid_scales": [1.0]},
    "no_fusion": {"region_fusion_rounds": 0},
    "image_tokens_49": {"vision_feature_layer": 3},
}


def mean_exact_match(per_kind: dict, kinds: tuple[str, ...]) -> float:
    scored = [per_kind[kind] for kind in kinds if kind in per_kind]
    questions = sum(score["questions"] for score in scored)
    return round(sum(score["exact_match"] * score["questions"] for score in scored) / max(questions, 1), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument(
        "--full-model", type=Path, help="evaluate this model as 'full' instead of training it"
    )
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ablation-"))
    train_world, held_out_world = work / f"world-{TRAIN_SEED}", work / f"world-{HELD_OUT_SEED}"
    if not (train_world / "data.jsonl").is_file():
        generate_world(
            train_world, TRAIN_IMAGES, TRAIN_SEED, kind_weights=TRAIN_KIND_WEIGHTS, exclude=HELD_BACK
        )
    if not (held_out_world / "data.jsonl").is_file():
        generate_world(held_out_world, HELD_OUT_IMAGES, HELD_OUT_SEED, exclude=HELD_BACK)
    vocabulary = [value for values in ATTRIBUTES.values() for value in values]

    results = {}
    for name in args.variants.split(","):
        started = time.monotonic()
        out = work / f"model-{name}"
        if name == "full" and args.full_model:
            out = args.full_model
        else:
            # The Trainer prints its log lines on stdout; this script's stdout is its one JSON line.
            with contextlib.redirect_stdout(sys.stderr):
                train(
                    TrainOptions(
                        data=[train_world / "data.jsonl"],
                        out=out,
                        config_overrides=VARIANTS[name],
                        save_every=args.steps,
                        extra_vocabulary=vocabulary,
                        seed=TRAIN_SEED,
                        **{**RECIPE, "steps": args.steps},
                    )
                )
        metrics = evaluate(out, held_out_world / "data.jsonl")
        per_kind = metrics["per_kind"]
        results[name] = {
            "caption": mean_exact_match(per_kind, ("caption",)),
            "relations": mean_exact_match(per_kind, ("left", "larger")),
            "attributes": mean_exact_match(per_kind, ("colour", "shape", "size")),
            "per_kind": {kind: score["exact_match"] for kind, score in per_kind.items()},
            "minutes": round((time.monotonic() - started) / 60, 1),
        }
        print(f"{name}: {results[name]}", file=sys.stderr)
    print(
        json.dumps(
            {
                "steps": args.steps,
                "images": TRAIN_IMAGES,
                "threads": torch.get_num_threads(),
                "variants": results,
            }
        )
    )


if __name__ == "__main__":
    main()
