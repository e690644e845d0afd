"""LoRA fine-tuning of the Qwen-VL families through roi_model.training.train (roi_model.family_training)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_qwen import tiny_qwen

from roi_model.engine import ImageRequest, RegionQuery
from roi_model.families import load_region_model
from roi_model.family_training import add_lora, example_loss, record_examples
from roi_model.generation import GenerationOptions
from roi_model.training import TrainOptions, train


def _records(folder):
    Image.new("RGB", (96, 64), "red").save(folder / "a.png")
    record = {
        "id": "t1",
        "image": "a.png",
        "width": 96,
        "height": 64,
        "regions": [[10, 8, 50, 40]],
        "conversations": [
            {"from": "human", "value": "Describe <region1> .", "kind": "caption"},
            {"from": "gpt", "value": "a red circle"},
        ],
    }
    path = folder / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_lora_step_lowers_the_loss(family, tmp_path):
    qwen = tiny_qwen(family)
    data = _records(tmp_path)
    [example] = record_examples(qwen, [{**json.loads(data.read_text()), "_root": str(tmp_path)}])
    model = add_lora(qwen.model, rank=4, alpha=8)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and "language_model" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    before = example_loss(model, example, torch.device("cpu"))
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = example_loss(model, example, torch.device("cpu"))
    assert after < before


def test_roi_model_train_fine_tunes_a_qwen_directory(tmp_path):
    qwen = tiny_qwen("qwen2_5_vl")
    base = tmp_path / "base"
    qwen.save_pretrained(base)
    data = _records(tmp_path)
    out = tmp_path / "tuned"
    summary = train(
        TrainOptions(
            data=[data],
            out=out,
            init=base,
            stage="lora",
            steps=6,
            batch_size=1,
            learning_rate=5e-2,
            lora_rank=4,
        )
    )
    assert summary["family"] == "qwen2_5_vl" and summary["steps"] == 6
    losses = [entry["loss"] for entry in summary["loss_curve"]]
    assert losses[-1] < losses[0]
    tuned = load_region_model(out, device="cpu")
    assert tuned.family == "qwen2_5_vl"
    assert not any("lora" in name for name, _ in tuned.model.named_parameters())
    request = ImageRequest(
        Image.open(tmp_path / "a.png"),
        [RegionQuery("Describe <region1> .", [[0.1, 0.1, 0.5, 0.6]])],
        GenerationOptions(max_new_tokens=4),
    )
    [[answer]] = tuned.answer([request])
    assert answer.token_ids
    with pytest.raises(ValueError, match="stage 'projector'"):
        train(TrainOptions(data=[data], out=tmp_path / "x", init=base, stage="projector", steps=1))
