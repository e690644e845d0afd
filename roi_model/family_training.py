"""Fine-tuning a region model of another family than the region-LLM (Qwen-VL) through `roi-model train
--init DIR`: the family turns each record into its own training examples (RegionModel.training_examples),
LoRA adapters (peft) on the language model's linear layers learn, the vision tower stays frozen, and the
merged model is written to options.out like any other run (model, processor, training.json).

Stages: "lora" (adapters only) and "full" (the language model); the region-LLM's other stages
(projector, scratch) have no meaning for a model that reads boxes as text.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from roi_contract.records import TrainingRecord

from .families import load_region_model
from .processing import load_image
from .region_model import TrainingExample

logger = logging.getLogger(__name__)

LANGUAGE_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
FAMILY_STAGES = ("lora", "full")


def add_lora(model: torch.nn.Module, rank: int, alpha: int) -> torch.nn.Module:
    """The model wrapped with LoRA adapters on its language model; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LANGUAGE_LINEARS)
    return get_peft_model(model, config)


def record_examples(region_model, records: list[dict]) -> list[TrainingExample]:
    examples = []
    for record in records:
        root = Path(record.get("_root", "."))
        parsed = TrainingRecord.model_validate({k: v for k, v in record.items() if not k.startswith("_")})
        image: Image.Image = load_image(root / parsed.image)
        examples += region_model.training_examples(parsed, image)
    return examples


def example_loss(model: torch.nn.Module, example: TrainingExample, device: torch.device) -> torch.Tensor:
    inputs = {key: value.to(device) for key, value in example.inputs.items()}
    return model(**inputs, labels=example.labels.to(device)).loss


def train_family(options, records: list[dict]) -> dict:
    """One run of options (roi_model.training.TrainOptions) on a model of a non-region-LLM family."""
    if options.stage not in FAMILY_STAGES:
        raise ValueError(
            f"stage {options.stage!r} is for the region-LLM; a {options.init} model trains with "
            f"{' or '.join(FAMILY_STAGES)}"
        )
    started = time.monotonic()
    region_model = load_region_model(options.init, device=options.device, dtype="float32")
    examples = record_examples(region_model, records)
    torch.manual_seed(options.seed)
    model = region_model.model
    model.requires_grad_(False)
    if options.stage == "lora":
        model = add_lora(model, options.lora_rank, options.lora_alpha)
    else:
        model.model.language_model.requires_grad_(True)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    order = random.Random(options.seed)
    curve, step = [], 0
    deadline = started + options.max_minutes * 60 if options.max_minutes else math.inf
    while step < options.steps and time.monotonic() < deadline:
        batch = order.sample(examples, min(options.batch_size, len(examples)))
        optimizer.zero_grad()
        loss = sum(example_loss(model, example, region_model.device) for example in batch) / len(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, options.max_grad_norm)
        optimizer.step()
        step += 1
        value = float(loss.detach())
        curve.append({"step": step, "loss": round(value, 5)})
        if options.on_log:
            options.on_log({"step": step, "loss": value})
    model.eval()
    region_model.model = model.merge_and_unload() if options.stage == "lora" else model
    options.out.mkdir(parents=True, exist_ok=True)
    region_model.save_pretrained(options.out)
    summary = {
        "family": region_model.family,
        "stage": options.stage,
        "steps": step,
        "train_loss": curve[-1]["loss"] if curve else None,
        "eval_loss": None,
        "eval_exact_match": None,
        "trainable_parameters": sum(p.numel() for p in parameters),
        "processes": 1,
        "loss_curve": curve,
        "diverged": bool(curve) and not math.isfinite(curve[-1]["loss"]),
        "minutes": round((time.monotonic() - started) / 60, 2),
        "options": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in asdict(options).items()
            if key not in ("on_log", "data")
        },
    }
    summary["options"]["data"] = [str(path) for path in options.data]
    (options.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
