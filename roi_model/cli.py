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

from roi_contract.describe import DEFAULT_MAX_NEW_TOKENS
from roi_contract.project import DEFAULT_CAPTION_PROMPT


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
    from .engine import ImageRequest, RegionQuery
    from .families import load_region_model
    from .generation import GenerationOptions
    from .processing import load_image

    engine = load_region_model(args.model, device=args.device)
    image = load_image(args.image)
    if args.question:
        queries = [RegionQuery(question, args.box) for question in args.question]
    else:  # a caption for each box
        queries = [RegionQuery(DEFAULT_CAPTION_PROMPT, [box]) for box in args.box]
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    (answers,) = engine.answer([ImageRequest(image, queries, options)])
    print_json(
        {
            "model": str(args.model),
            "family": engine.family,
            "image": str(args.image),
            "answers": [
                {
                    "question": query.question,
                    "boxes": query.boxes,
                    "text": answer.text,
                    "score": round(answer.score, 4),
                    "truncated": answer.truncated,
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


# synth / train / eval / demo-model ---------------------------------------------------------------------
def synth(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .synthetic import generate_world

    exclude = {args.exclude_attribute: set(args.exclude_value)} if args.exclude_value else None
    only = {args.only_attribute: set(args.only_value)} if args.only_value else None
    summary = generate_world(args.out, args.images, args.seed, exclude=exclude, include_only=only)
    print_json({"out": str(args.out), **asdict(summary)})
    return 0


def train(args: argparse.Namespace) -> int:
    from .training import TrainOptions
    from .training import train as run_training

    options = TrainOptions(
        data=args.data,
        out=args.out,
        init=args.init,
        config=args.config,
        stage=args.stage,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        eval_data=args.eval_data,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        lora_rank=args.lora_rank,
        resume=args.resume,
        max_minutes=args.max_minutes,
        device=args.device,
    )
    summary = run_training(options)
    print_json({key: value for key, value in summary.items() if key != "options"})
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate as run_evaluation
    from .text_metrics import metrics_table

    metrics = run_evaluation(
        args.model, args.data, device=args.device, limit=args.limit, java=False if args.no_java else None
    )
    if args.table:
        print(metrics_table(metrics["per_kind"]))
    else:
        print_json(metrics)
    return 0


def demo_model(args: argparse.Namespace) -> int:
    from .demo_model import build_demo_model

    print_json(build_demo_model(args.out, work_dir=args.work_dir))
    return 0


# convert-gpt4roi / init ---------------------------------------------------------------------------------
def convert_gpt4roi(args: argparse.Namespace) -> int:
    from .convert import convert_gpt4roi as run_conversion

    print_json(run_conversion(args.delta, args.base, args.clip, args.out, dtype=args.dtype))
    return 0


def init_model(args: argparse.Namespace) -> int:
    from .convert import init_from_base

    overrides = {}
    for setting in args.set or []:
        field, separator, value = setting.partition("=")
        if not separator:
            raise ValueError(f"--set {setting!r}: expected FIELD=VALUE, e.g. region_embed_dim=256")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value  # a bare string, e.g. template=chat
    summary = init_from_base(
        args.vision, args.llm, args.out, dtype=args.dtype, overrides=overrides, seed=args.seed
    )
    print_json(summary)
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
    command.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
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

    command = commands.add_parser(
        "synth", help="write a synthetic region world (images and spatial-instruction JSONL)"
    )
    command.add_argument("--out", type=Path, required=True)
    command.add_argument("--images", type=int, required=True)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--exclude-attribute", default="colour", help="attribute of --exclude-value")
    command.add_argument(
        "--exclude-value", action="append", help="leave this value out of the world (repeatable)"
    )
    command.add_argument("--only-attribute", default="colour", help="attribute of --only-value")
    command.add_argument("--only-value", action="append", help="give every object this value (repeatable)")
    command.set_defaults(func=synth)

    command = commands.add_parser(
        "train", help="train on spatial-instruction JSONL; writes a model directory"
    )
    command.add_argument(
        "--data", type=Path, action="append", required=True, help="JSONL; repeat to mix sets"
    )
    command.add_argument("--out", type=Path, required=True)
    start = command.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", type=Path, help="model directory to start from")
    start.add_argument("--config", help="named config to build from scratch (see `info --config`)")
    command.add_argument(
        "--stage", default="lora", choices=["region", "projector", "lora", "full", "scratch"]
    )
    command.add_argument("--steps", type=int, default=1000)
    command.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    command.add_argument("--lr", type=float, default=3e-4)
    command.add_argument("--warmup-steps", type=int, default=100)
    command.add_argument("--eval-data", type=Path)
    command.add_argument("--eval-every", type=int, default=200)
    command.add_argument("--save-every", type=int, default=200)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--lora-rank", type=int, default=16)
    command.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    command.add_argument("--max-minutes", type=float, help="stop cleanly after this much wall-clock time")
    command.add_argument("--device", default=None)
    command.set_defaults(func=train)

    command = commands.add_parser(
        "eval",
        help="scores per question kind on held-out JSONL (one JSON line): exact match and token-F1, and for "
        "free text BLEU-4, METEOR (needs java), ROUGE-L, CIDEr-D",
    )
    command.add_argument("--model", type=Path, required=True)
    command.add_argument("--data", type=Path, required=True)
    command.add_argument("--limit", type=int, help="evaluate the first N records only")
    command.add_argument("--table", action="store_true", help="print a table of the metrics per kind instead")
    command.add_argument(
        "--no-java", action="store_true", help="skip the Java runtime: simple tokenization, no METEOR"
    )
    command.add_argument("--device", default=None)
    command.set_defaults(func=evaluate)

    command = commands.add_parser("demo-model", help="train the shipped demo model (seeded, reproducible)")
    command.add_argument("--out", type=Path, default=Path("models/demo"))
    command.add_argument("--work-dir", type=Path, default=Path(".cache/demo-model"))
    command.set_defaults(func=demo_model)

    command = commands.add_parser(
        "convert-gpt4roi",
        help="convert the released GPT4RoI-7B (a delta over LLaMA-1 7B) into a model directory",
    )
    command.add_argument("--delta", type=Path, required=True, help="GPT4RoI-7B-delta-V0 directory")
    command.add_argument("--base", type=Path, required=True, help="LLaMA-1 7B in Hugging Face format")
    command.add_argument("--clip", type=Path, required=True, help="openai/clip-vit-large-patch14 directory")
    command.add_argument("--out", type=Path, required=True, help="new model directory")
    command.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    command.set_defaults(func=convert_gpt4roi)

    command = commands.add_parser(
        "init", help="a new region-LLM from a local CLIP/SigLIP model and a local causal LM, ready to train"
    )
    command.add_argument("--vision", type=Path, required=True, help="CLIP or SigLIP directory")
    command.add_argument("--llm", type=Path, required=True, help="causal LM: Llama, Qwen2, Mistral ...")
    command.add_argument("--out", type=Path, required=True, help="new model directory")
    command.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: the LM's own")
    command.add_argument(
        "--set", action="append", metavar="FIELD=VALUE", help="a config field, e.g. region_embed_dim=256"
    )
    command.add_argument("--seed", type=int, default=0, help="seed of the new projector and region encoder")
    command.set_defaults(func=init_model)

    # A plugin is `register_cli(add_command)`, called with the subparsers' add_parser: it adds its commands.
    for plugin in entry_points(group="roi_model.commands"):
        plugin.load()(commands.add_parser)
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
