"""Florence-2 as a region model on a tiny random config, with a tokenizer built here."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    PreTrainedTokenizerFast,
)

from roi_contract.records import TrainingRecord
from roi_model.engine import ImageRequest, RegionQuery
from roi_model.families import detect_family, load_region_model
from roi_model.florence import FlorenceRegionModel, bins_to_box, location_bins
from roi_model.generation import GenerationOptions
from roi_model.region_model import RegionModel

LOCATIONS = [f"<loc_{k}>" for k in range(1000)]
WORDS = ["What", "does", "the", "region", "describe", "?", "a", "red", "circle", "is", "left", "of"]


def tiny_florence() -> FlorenceRegionModel:
    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {word: index for index, word in enumerate([*special, *WORDS, *LOCATIONS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        additional_special_tokens=LOCATIONS,
    )
    config = Florence2Config(
        vision_config=dict(
            depths=[1, 1, 1, 1],
            embed_dim=[8, 16, 16, 32],
            num_heads=[1, 2, 2, 2],
            num_groups=[1, 2, 2, 2],
            window_size=2,
            projection_dim=32,
            max_position_embeddings=8,
        ),
        text_config=dict(
            model_type="bart",
            vocab_size=len(vocab),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        image_token_id=vocab["<image>"],
    )
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config)
    model.generation_config.eos_token_id = 2
    model.generation_config.decoder_start_token_id = 2
    model.generation_config.pad_token_id = 0
    image_processor = CLIPImageProcessor(
        size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=wrapped)
    return FlorenceRegionModel(model.eval(), processor)


@pytest.fixture(scope="module")
def florence():
    return tiny_florence()


def test_region_prompt_follows_the_task_convention(florence):
    assert isinstance(florence, RegionModel)
    one = florence.prompt("<REGION_TO_DESCRIPTION><region1>", [[0.1, 0.2, 0.5, 0.6]])
    assert one == "<s>What does the region <loc_100><loc_200><loc_500><loc_600> describe?</s>"
    two = florence.prompt("is <region1> left of <region2> ?", [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]])
    assert "<loc_100><loc_200><loc_500><loc_600> left of <loc_0><loc_0><loc_999><loc_999>" in two
    # the processor's own task expansion and layout give the same token ids
    image = Image.new("RGB", (120, 80))
    ours = florence._inputs(
        "<REGION_TO_DESCRIPTION><region1>", [[0.1, 0.2, 0.5, 0.6]], florence.pixel_values(image)
    )
    reference = florence.processor(
        text=["<REGION_TO_DESCRIPTION><loc_100><loc_200><loc_500><loc_600>"],
        images=[image],
        return_tensors="pt",
    )
    assert ours["input_ids"].tolist() == reference["input_ids"].tolist()


@pytest.mark.parametrize("size, pixel_box", [((1200, 100), [0, 10, 300, 90]), ((60, 900), [5, 850, 60, 900])])
def test_bins_map_back_to_the_annotated_pixels(size, pixel_box):
    width, height = size
    box = [pixel_box[0] / width, pixel_box[1] / height, pixel_box[2] / width, pixel_box[3] / height]
    back = bins_to_box(location_bins(box))
    for axis, (got, wanted) in enumerate(zip(back, box, strict=True)):
        side = width if axis % 2 == 0 else height
        assert abs(got - wanted) * side <= side / 1000 + 1e-9  # within one bin


def test_answers_equal_plain_generate_and_survive_save_reload(florence, tmp_path):
    image = Image.new("RGB", (90, 60), "red")
    queries = [
        RegionQuery("<REGION_TO_DESCRIPTION><region1>", [[0.1, 0.1, 0.5, 0.9]]),
        RegionQuery("is <region1> left of <region2> ?", [[0, 0, 0.3, 0.5], [0.5, 0.2, 1, 1]]),
    ]
    request = ImageRequest(image, queries, GenerationOptions(max_new_tokens=5))
    [answers] = florence.answer([request])
    for query, answer in zip(queries, answers, strict=True):
        inputs = florence._inputs(query.question, query.boxes, florence.pixel_values(image))
        plain = florence.model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, 1:].tolist()
        length = next((i + 1 for i, token in enumerate(plain) if token == 2), len(plain))
        assert answer.token_ids == plain[:length]
    florence.save_pretrained(tmp_path)
    assert detect_family(tmp_path) == "florence2"
    reloaded = load_region_model(tmp_path, device="cpu")
    assert [a.token_ids for a in reloaded.answer([request])[0]] == [a.token_ids for a in answers]


def test_training_example_and_a_step_lowers_the_loss():
    florence = tiny_florence()  # trained here: not the module's shared model
    record = TrainingRecord.model_validate(
        {
            "id": "f",
            "image": "x.png",
            "width": 90,
            "height": 60,
            "regions": [[9, 6, 45, 54]],
            "conversations": [
                {"from": "human", "value": "<REGION_TO_DESCRIPTION><region1>"},
                {"from": "gpt", "value": "a red circle"},
            ],
        }
    )
    [example] = florence.training_examples(record, Image.new("RGB", (90, 60), "red"))
    model = florence.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model(**example.inputs, labels=example.labels).loss
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(**example.inputs, labels=example.labels).loss
    model.eval()
    assert after < before
