"""Training on spatial-instruction records, with the Hugging Face Trainer.

Records are the JSONL of DESIGN.md: one image, its pixel boxes, a conversation that refers to
them as `<regionK>`. By default each question of a record becomes its own row (the way the
model is asked at inference), and every row of a record shares one pass of the vision tower.

Stages, as in GPT4RoI: "region" trains the region encoder only; "projector" adds the image
projector; "lora" adds LoRA adapters on the LLM (merged into the weights at the end); "full"
trains everything but the vision tower; "scratch" trains everything (a model built from config,
where nothing is pretrained). With `adapter_only` the "lora" stage trains the LoRA adapters alone and writes
them unmerged (a peft adapter directory, roi_model/adapters.py): a project's adapter on the shared base.

Several processes: run under `torchrun --nproc_per_node N` (or `accelerate launch`), one process per
device, and the Trainer trains data-parallel (DDP; gloo on CPUs, NCCL on GPUs; FSDP for the "full" stage on
GPUs). `batch_size` is the global batch: each process takes `batch_size / N` records a step, so a run of N
processes takes the same steps over the same records as one process. Only the first process writes the
model, its plot and its summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from roi_contract.describe import REGION_REFERENCE
from roi_contract.records import TrainingRecord
from roi_contract.validation import parse

from .assembly import build_model, save_pretrained
from .loading import load_pretrained
from .modeling import RegionLLMForCausalLM
from .processing import IGNORE_INDEX, RegionProcessor, load_image
from .word_tokenizer import train_word_tokenizer

logger = logging.getLogger(__name__)

STAGES = ("region", "projector", "lora", "full", "scratch")
REGION_NAME = re.compile(r"\bregion(\d+)\b")


@dataclass
class TrainOptions:
    data: list[Path]
    out: Path
    init: Path | None = None  # a model directory to start from ...
    config: str | None = None  # ... or a named config (roi_model.presets) built from scratch,
    config_overrides: dict = field(default_factory=dict)  # with these fields replaced
    stage: str = "lora"
    steps: int = 1000
    batch_size: int = 8  # records (images) per step; each record gives one row per question
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_data: Path | None = None
    eval_every: int = 200
    eval_records: int = 64
    save_every: int = 200
    seed: int = 0
    lora_rank: int = 16
    lora_alpha: int = 32
    split_turns: bool = True
    resume: bool = False
    max_minutes: float | None = None
    keep_checkpoints: bool = False
    extra_vocabulary: list[str] = field(default_factory=list)
    device: str | None = None
    adapter_only: bool = False  # "lora" stage: train and write the LoRA adapter alone, not a merged model
    on_log: Callable[[dict], None] | None = None  # called with each logged step's figures (progress reports)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; use one of {', '.join(STAGES)}")
        if (self.init is None) == (self.config is None):
            raise ValueError("give exactly one of --init (a model directory) or --config (a named config)")
        if self.adapter_only and (self.stage != "lora" or self.init is None):
            raise ValueError("an adapter alone is trained by the lora stage from a model directory (--init)")


# data ---------------------------------------------------------------------------------------------------
def read_records(paths: Iterable[Path]) -> list[dict]:
    """Records of one or more JSONL files; each remembers its folder, against which its image path resolves."""
    records = []
    for path in paths:
        path = Path(path)
        with path.open() as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not JSON: {error}") from None
                parse(TrainingRecord, record, f"{path}:{number}")  # ContractError names the problem
                record["_root"] = str(path.parent)
                records.append(record)
    if not records:
        raise ValueError(f"no records in {', '.join(map(str, paths))}")
    return records


def normalized_boxes(record: dict) -> list[list[float]]:
    width, height = record["width"], record["height"]
    return [[x1 / width, y1 / height, x2 / width, y2 / height] for x1, y1, x2, y2 in record["regions"]]


def question_rows(record: dict, split: bool) -> list[tuple[list[tuple[str, str]], list[int], str | None]]:
    """(turns, region indices, question kind) for each training row of a record.

    Split rows hold one question each, with its regions renumbered from 1 in order of mention;
    "regionK" in the answer is renumbered alike (a "which is larger" answer names a region).
    """
    pairs = []
    conversation = record["conversations"]
    for index in range(0, len(conversation) - 1, 2):
        human, gpt = conversation[index], conversation[index + 1]
        if human["from"] != "human" or gpt["from"] != "gpt":
            raise ValueError(f"record {record.get('id')}: turns must alternate human, gpt")
        pairs.append((human["value"], gpt["value"], human.get("kind")))
    if not split:
        turns = [
            turn for question, answer, _ in pairs for turn in (("user", question), ("assistant", answer))
        ]
        return [(turns, list(range(len(record["regions"]))), None)]
    rows = []
    for question, answer, kind in pairs:
        mentioned = list(dict.fromkeys(int(number) for number in REGION_REFERENCE.findall(question)))
        local = {number: position + 1 for position, number in enumerate(mentioned)}

        def renumber(pattern: re.Pattern, text: str, template: str, mapping=local) -> str:
            return pattern.sub(lambda m: template.format(mapping.get(int(m.group(1)), int(m.group(1)))), text)

        turns = [
            ("user", renumber(REGION_REFERENCE, question, "<region{}>")),
            ("assistant", renumber(REGION_NAME, answer, "region{}")),
        ]
        rows.append((turns, [number - 1 for number in mentioned], kind))
    return rows


class RecordImages:
    """Decoded images held in memory after the processor's 8-bit resize: a record's image is read from disk once."""

    def __init__(self, processor: RegionProcessor):
        self.processor = processor
        self.cache: dict[str, torch.Tensor] = {}

    def pixel_values(self, record: dict) -> torch.Tensor:
        path = str(Path(record["_root"]) / record["image"])
        if path not in self.cache:
            self.cache[path] = self.processor.resize_image(load_image(Path(path)))
        return self.processor.normalize_pixels(self.cache[path])


class RegionCollator:
    """Records -> one batch: every question row, the images once, and which image each row shows."""

    def __init__(self, processor: RegionProcessor, split_turns: bool = True):
        self.processor = processor
        self.split_turns = split_turns
        self.images = RecordImages(processor)

    def __call__(self, records: Sequence[dict]) -> dict:
        examples, image_index = [], []
        for position, record in enumerate(records):
            boxes = normalized_boxes(record)
            for turns, regions, _ in question_rows(record, self.split_turns):
                encoded = self.processor.encode(turns, len(regions), generation=False)
                row_boxes = torch.tensor([boxes[regions[k]] for k in encoded.box_order]).reshape(-1, 4)
                examples.append((encoded, row_boxes))
                image_index.append(position)
        longest = max(len(encoded.input_ids) for encoded, _ in examples)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(examples), longest), pad, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, (encoded, _) in enumerate(examples):
            length = len(encoded.input_ids)
            input_ids[row, :length] = torch.tensor(encoded.input_ids)
            labels[row, :length] = torch.tensor(encoded.labels)
            attention_mask[row, :length] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack([self.images.pixel_values(record) for record in records]),
            "image_index": torch.tensor(image_index),
            "boxes": [row_boxes for _, row_boxes in examples],
        }


class RecordDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]


# model ------------------------------------------------------------------------------------------------
def record_texts(records: Iterable[dict]) -> Iterable[str]:
    for record in records:
        for turn in record["conversations"]:
            yield REGION_REFERENCE.sub(" ", turn["value"])


def prepare_model(options: TrainOptions, records: list[dict]) -> tuple[RegionLLMForCausalLM, RegionProcessor]:
    if options.init is not None:
        return load_pretrained(options.init, device=options.device, dtype="float32")
    from .presets import preset_config

    config = preset_config(options.config, **options.config_overrides)
    config.freeze_vision_tower = options.stage != "scratch"
    tokenizer = train_word_tokenizer([*record_texts(records), " ".join(options.extra_vocabulary)])
    torch.manual_seed(options.seed)
    return build_model(config, tokenizer)


def apply_stage(model: RegionLLMForCausalLM, options: TrainOptions) -> RegionLLMForCausalLM:
    """Freeze what the stage does not train; wrap the LLM with LoRA adapters for the "lora" stage."""
    model.requires_grad_(options.stage == "scratch")
    model.config.freeze_vision_tower = options.stage != "scratch"
    model.region_encoder.requires_grad_(not options.adapter_only)
    if options.stage in ("projector", "lora", "full") and not options.adapter_only:
        model.mm_projector.requires_grad_(True)
    if options.stage == "full":
        model.language_model.requires_grad_(True)
    if options.stage == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=options.lora_rank,
            lora_alpha=options.lora_alpha,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        model.language_model = get_peft_model(model.language_model, lora)
    return model


def merge_adapters(model: RegionLLMForCausalLM) -> RegionLLMForCausalLM:
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()
    return model


# metrics and callbacks -----------------------------------------------------------------------------------
def answer_argmax(logits, labels):
    return logits.argmax(dim=-1)


def teacher_forced_exact_match(prediction) -> dict:
    """Share of rows whose every answer token is the argmax: exactly the rows greedy decoding gets right."""
    predicted, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    answer = labels != IGNORE_INDEX
    correct = ((predicted == labels) | ~answer).all(axis=1)
    return {"exact_match": float(correct[answer.any(axis=1)].mean())}


class TimeBudget(TrainerCallback):
    """Stop cleanly (saving a checkpoint) once the wall-clock budget is spent."""

    def __init__(self, minutes: float):
        self.deadline = time.monotonic() + minutes * 60

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline:
            logger.warning("time budget spent at step %d", state.global_step)
            control.should_training_stop = True
            control.should_save = True


class ReportLogs(TrainerCallback):
    def __init__(self, report: Callable[[dict], None]):
        self.report = report

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.report({"step": state.global_step, "max_steps": state.max_steps, **(logs or {})})


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if train:
        axis.plot(*zip(*train, strict=True), label="train")
    if evaluation:
        axis.plot(*zip(*evaluation, strict=True), marker="o", label="held-out")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# the training run --------------------------------------------------------------------------------------
def _parallel_arguments(processes: int, use_cpu: bool, stage: str) -> dict:
    """TrainingArguments for a run over several processes (none for one)."""
    if processes == 1:
        return {}
    if use_cpu:
        return {"ddp_backend": "gloo"}
    if stage in ("full", "scratch"):  # every weight trains: shard them instead of copying them N times
        return {"fsdp": "full_shard auto_wrap", "ddp_backend": "nccl"}
    return {"ddp_backend": "nccl"}


def train(options: TrainOptions) -> dict:
    """Train, then write a complete model directory to options.out. Returns the run's summary."""
    started = time.monotonic()
    records = read_records(options.data)
    if options.init is not None:
        from .families import detect_family

        if detect_family(options.init) != "region_llm":  # Qwen-VL: roi_model.family_training
            if options.adapter_only:
                raise ValueError(f"{options.init}: adapters alone are trained on region-LLM models only")
            from .family_training import train_family

            return train_family(options, records)
    eval_records = read_records([options.eval_data])[: options.eval_records] if options.eval_data else None
    model, processor = prepare_model(options, records + (eval_records or []))
    torch.manual_seed(options.seed)  # LoRA adapters start random: the same seed gives the same run
    model = apply_stage(model, options)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("stage %s: %d trainable parameters", options.stage, trainable)

    checkpoints = options.out / "checkpoints"
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if options.batch_size % processes:
        raise ValueError(
            f"the batch of {options.batch_size} records does not split over {processes} processes"
        )
    use_cpu = options.device == "cpu" or not torch.cuda.is_available()
    arguments = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size // processes,
        per_device_eval_batch_size=options.batch_size // processes,
        learning_rate=options.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        logging_steps=max(1, min(50, options.steps // 20)),
        eval_strategy="steps" if eval_records else "no",
        eval_steps=options.eval_every,
        save_strategy="steps",
        save_steps=options.save_every,
        save_total_limit=2,
        seed=options.seed,
        data_seed=options.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to=[],
        use_cpu=use_cpu,
        disable_tqdm=False,
        **_parallel_arguments(processes, use_cpu, options.stage),
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=RecordDataset(records),
        eval_dataset=RecordDataset(eval_records) if eval_records else None,
        data_collator=RegionCollator(processor, options.split_turns),
        compute_metrics=teacher_forced_exact_match if eval_records else None,
        preprocess_logits_for_metrics=answer_argmax if eval_records else None,
        callbacks=[
            *([TimeBudget(options.max_minutes)] if options.max_minutes else []),
            *([ReportLogs(options.on_log)] if options.on_log else []),
        ],
    )
    resume = options.resume and any(checkpoints.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume else None)

    final_eval = trainer.evaluate() if eval_records else {}  # every process takes part
    first_process = trainer.is_world_process_zero()
    if first_process and options.adapter_only:
        options.out.mkdir(parents=True, exist_ok=True)
        trainer.accelerator.unwrap_model(trainer.model).language_model.save_pretrained(options.out)
        plot_loss_curve(trainer.state.log_history, options.out / "loss_curve.png")
    elif first_process:
        model = merge_adapters(trainer.accelerator.unwrap_model(trainer.model))
        model.config.freeze_vision_tower = True
        options.out.mkdir(parents=True, exist_ok=True)
        save_pretrained(model, processor, options.out)
        plot_loss_curve(trainer.state.log_history, options.out / "loss_curve.png")
    summary = {
        "stage": options.stage,
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 5),
        "eval_loss": round(final_eval["eval_loss"], 5) if final_eval else None,
        "eval_exact_match": round(final_eval["eval_exact_match"], 4) if final_eval else None,
        "trainable_parameters": trainable,
        "processes": processes,
        "loss_curve": [
            {"step": entry["step"], "loss": entry["loss"]}
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
        "diverged": not math.isfinite(result.training_loss),
        "minutes": round((time.monotonic() - started) / 60, 2),
        "options": {
            key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()
        },
    }
    summary["options"]["data"] = [str(path) for path in options.data]
    summary["options"].pop("on_log")
    if not first_process:
        return summary
    (options.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["steps"] < options.steps:
        logger.warning(
            "stopped at step %d of %d; the checkpoints stay in %s for --resume",
            summary["steps"],
            options.steps,
            checkpoints,
        )
    elif not options.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return summary
