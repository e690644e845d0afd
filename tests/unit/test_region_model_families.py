"""The family loader on a region-LLM directory: the GPT4RoI-architecture model behind the region-model
interface (roi_model.gpt4roi), answering as its engine does."""

from __future__ import annotations

import torch
from tiny_models import make_tiny, noise_image

from roi_contract.records import TrainingRecord
from roi_model.assembly import save_pretrained
from roi_model.engine import ImageRequest, RegionEngine, RegionQuery
from roi_model.families import detect_family, load_region_model
from roi_model.generation import GenerationOptions
from roi_model.gpt4roi import GPT4RoIRegionModel
from roi_model.region_model import RegionModel


def test_a_region_llm_directory_loads_as_the_gpt4roi_family(tmp_path):
    model, processor = make_tiny("clip")
    save_pretrained(model, processor, tmp_path)
    assert detect_family(tmp_path) == "region_llm"
    region_model = load_region_model(tmp_path, device="cpu")
    assert isinstance(region_model, GPT4RoIRegionModel) and isinstance(region_model, RegionModel)
    image = noise_image(64, 48)
    request = ImageRequest(
        image,
        [RegionQuery("Describe <region1> briefly.", [[0.1, 0.2, 0.6, 0.7]])],
        GenerationOptions(max_new_tokens=4),
    )
    engine = RegionEngine.from_pretrained(tmp_path, device="cpu")
    assert [a.token_ids for a in region_model.answer([request])[0]] == [
        a.token_ids for a in engine.answer([request])[0]
    ]

    record = TrainingRecord.model_validate(
        {
            "id": "r",
            "image": "x.png",
            "width": 64,
            "height": 48,
            "regions": [[6, 9, 38, 33]],
            "conversations": [
                {"from": "human", "value": "Describe <region1> briefly."},
                {"from": "gpt", "value": "a"},
            ],
        }
    )
    [example] = region_model.training_examples(record, image)
    assert (example.labels != -100).any()
    loss = region_model.model(**example.inputs, labels=example.labels).loss
    assert torch.isfinite(loss)

    region_model.save_pretrained(tmp_path / "again")
    assert detect_family(tmp_path / "again") == "region_llm"
