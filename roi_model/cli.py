"""`roi-model`: the command line of the region-LLM.

Model commands live here. Other packages add theirs (registry, export) through the
"roi_model.commands" entry-point group, so this package never imports them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

DEFAULT_CAPTION_QUESTION = "Describe <region1> briefly."


def parse_box(text: str) -> list[float]:
    try:
        box = [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"box {text!r} must be four numbers x1,y1,x2,y2") from None
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"box {text!r} must be four numbers x1,y1,x2,y2")
    return box


def print_json(payload: dict) -> None:
    print(json.dumps(payload, ensure_ascii=False))


# describe ---------------------------------------------------------------------------------------------
def describe(args: argparse.Namespace) -> int:
    from .engine import ImageRequest, RegionEngine, RegionQuery
    from .generation import GenerationOptions
    from .processing import load_image

    engine = RegionEngine.from_pretrained(args.model, device=args.device)
    image = load_image(args.image)
    if args.question:
        queries = [RegionQuery(question, args.box) for question in args.question]
    else:  # a caption for each box
        queries = [RegionQuery(DEFAULT_CAPTION_QUESTION, [box]) for box in args.box]
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    (answers,) = engine.answer([ImageRequest(image, queries, options)])
    print_json(
        {
            "model": str(args.model),
            "image": str(args.image),
            "answers": [
                {
                    "question": query.question,
                    "boxes": query.boxes,
                    "text": answer.text,
                    "score": round(answer.score, 4),
                }
                for query, answer in zip(queries, answers, strict=True)
            ],
        }
    )
    return 0


# info -------------------------------------------------------------------------------------------------
def info(args: argparse.Namespace) -> int:
    import torch

    from .configuration import RegionLLMConfig
    from .modeling import RegionLLMForCausalLM
    from .presets import preset_config

    config = preset_config(args.config) if args.config else RegionLLMConfig.from_pretrained(args.model)
    with torch.device("meta"):  # shapes only: a 7B model is counted without allocating it
        model = RegionLLMForCausalLM(config)
    parameters = {
        name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()
    }
    parameters["total"] = sum(parameters.values())
    print_json(
        {
            "config": config.to_diff_dict() if args.full_config is False else config.to_dict(),
            "image_tokens": model.num_image_tokens,
            "parameters": parameters,
        }
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roi-model", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    command = commands.add_parser("describe", help="answer questions about boxes on an image (one JSON line)")
    command.add_argument("--model", type=Path, required=True, help="model directory")
    command.add_argument("--image", type=Path, required=True)
    command.add_argument(
        "--box",
        type=parse_box,
        action="append",
        required=True,
        help="x1,y1,x2,y2 in 0..1; repeat for more boxes",
    )
    command.add_argument(
        "--question",
        action="append",
        help="a question over all boxes, e.g. 'Is <region1> left of <region2>?' (default: a caption per box)",
    )
    command.add_argument("--max-new-tokens", type=int, default=48)
    command.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    command.set_defaults(func=describe)

    command = commands.add_parser("info", help="config and parameter counts (no weights are loaded)")
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model directory")
    source.add_argument("--config", help="a named config: tiny-convnext, tiny-clip, tiny-siglip, gpt4roi-7b")
    command.add_argument(
        "--full-config", action="store_true", help="print every config field, not only non-defaults"
    )
    command.set_defaults(func=info)

    for plugin in entry_points(group="roi_model.commands"):
        plugin.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"roi-model {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
