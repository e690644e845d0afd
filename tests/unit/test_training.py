"""roi_model.training and `roi-model train|eval` on a tiny model and a small synthetic world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from roi_model.assembly import build_model
from roi_model.cli import main as cli_main
from roi_model.presets import preset_config
from roi_model.synthetic import generate_world
from roi_model.training import TrainOptions, apply_stage, train
from roi_model.word_tokenizer import train_word_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, 12, seed=5)
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny model trained from scratch through the CLI, with periodic evaluation."""
    out = tmp_path_factory.mktemp("trained") / "model"
    data = str(world / "data.jsonl")
    argv = ["train", "--data", data, "--out", str(out), "--config", "tiny-convnext", "--stage", "scratch"]
    argv += ["--steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--eval-data", data]
    assert cli_main([*argv, "--eval-every", "2", "--save-every", "2", "--seed", "3"]) == 0
    return out, json.loads((out / "training.json").read_text())


def test_training_writes_a_model_directory_with_its_loss_curve_and_summary(trained):
    out, summary = trained
    assert {"config.json", "model.safetensors", "tokenizer.json", "loss_curve.png"} <= {
        path.name for path in out.iterdir()
    }
    assert (out / "loss_curve.png").read_bytes().startswith(PNG)
    assert not (out / "checkpoints").exists(), "a finished run leaves no checkpoints behind"
    assert summary["steps"] == 4 and summary["stage"] == "scratch"
    assert summary["eval_loss"] is not None and 0.0 <= summary["eval_exact_match"] <= 1.0
    assert summary["diverged"] is False


def test_eval_prints_one_json_line_with_scores_per_kind_and_a_caption_confusion(trained, world, capsys):
    out, _ = trained
    capsys.readouterr()
    assert cli_main(["eval", "--model", str(out), "--data", str(world / "data.jsonl"), "--limit", "4"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    metrics = json.loads(line)
    assert 0.0 <= metrics["exact_match"] <= metrics["token_f1"] <= 1.0
    assert {"caption", "colour", "shape", "size"} & set(metrics["per_kind"])
    assert set(metrics["captions"]) == {"colour", "shape", "size"}
    assert {"accuracy", "confusion"} <= set(metrics["captions"]["colour"])


def lora_run(init: Path, world: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    options = TrainOptions(data=[world / "data.jsonl"], out=out, init=init, stage="lora", steps=2)
    options.batch_size, options.warmup_steps, options.seed, options.learning_rate = 4, 0, seed, 1e-2
    train(options)
    return load_file(out / "model.safetensors")


def test_a_lora_fine_tune_is_reproducible_for_a_seed(trained, world, tmp_path):
    init, _ = trained
    first = lora_run(init, world, tmp_path / "a", seed=7)
    again = lora_run(init, world, tmp_path / "b", seed=7)
    other = lora_run(init, world, tmp_path / "c", seed=8)

    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_a_run_stopped_by_its_time_budget_keeps_checkpoints_and_resumes(world, tmp_path):
    out = tmp_path / "model"
    options = dict(data=[world / "data.jsonl"], out=out, config="tiny-convnext", stage="scratch")
    options.update(steps=6, batch_size=4, warmup_steps=1, save_every=1)
    stopped = train(TrainOptions(**options, max_minutes=1e-9))
    assert stopped["steps"] < 6
    assert any((out / "checkpoints").glob("checkpoint-*"))

    logged: list[int] = []
    resumed = train(TrainOptions(**options, resume=True, on_log=lambda logs: logged.append(logs["step"])))
    assert resumed["steps"] == 6
    assert min(step for step in logged if step) > stopped["steps"], "the resumed run started over"
    assert not (out / "checkpoints").exists()


def trainable_parts(stage: str) -> set[str]:
    config = preset_config("tiny-convnext")
    model, _ = build_model(config, train_word_tokenizer(["a small red circle"]))
    options = TrainOptions(data=[], out=Path("unused"), config="tiny-convnext", stage=stage)
    model = apply_stage(model, options)
    parts = set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parts.add("lora" if "lora_" in name else name.split(".")[0])
    return parts


@pytest.mark.parametrize(
    ("stage", "parts"),
    [
        ("region", {"region_encoder"}),
        ("projector", {"region_encoder", "mm_projector"}),
        ("lora", {"region_encoder", "mm_projector", "lora"}),
        ("full", {"region_encoder", "mm_projector", "language_model"}),
        ("scratch", {"region_encoder", "mm_projector", "language_model", "vision_tower"}),
    ],
)
def test_each_stage_trains_its_parts_only(stage, parts):
    assert trainable_parts(stage) == parts


def test_bad_options_name_the_problem():
    with pytest.raises(ValueError, match="unknown stage 'everything'"):
        TrainOptions(data=[], out=Path("x"), config="tiny-convnext", stage="everything")
    with pytest.raises(ValueError, match="exactly one of --init"):
        TrainOptions(data=[], out=Path("x"), init=Path("m"), config="tiny-convnext")


def test_eval_prints_the_captioning_metrics_per_free_text_kind(trained, world, capsys):
    out, _ = trained
    capsys.readouterr()
    argv = ["eval", "--model", str(out), "--data", str(world / "data.jsonl"), "--limit", "8", "--no-java"]
    assert cli_main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    caption = metrics["per_kind"]["caption"]
    assert {"exact_match", "token_f1", "bleu4", "rouge_l", "cider_d"} <= set(caption)
    assert caption["meteor"] is None and caption["tokenizer"] == "simple"
    short = next(scores for kind, scores in metrics["per_kind"].items() if kind != "caption")
    assert "cider_d" not in short

    assert cli_main([*argv, "--table"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "kind",
        "questions",
        "exact_match",
        "token_f1",
        "bleu4",
        "meteor",
        "rouge_l",
        "cider_d",
    ]
    [caption_row] = [row for row in table if row.startswith("caption ")]
    assert caption_row.split()[-1].endswith("*") and "n/a" in caption_row  # CIDEr-D gates; no METEOR
    assert table[-1].startswith("note: no Java runtime")
