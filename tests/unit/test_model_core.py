"""The region-LLM core: shapes, region tokens, prompts, loss masking, persistence, generation, bad input."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image, ImageDraw
from tiny_models import TEXTS, make_tiny, noise_image, training_batch

from roi_model.assembly import build_model, save_pretrained
from roi_model.cli import main as cli_main
from roi_model.configuration import RegionLLMConfig
from roi_model.generation import GenerationOptions, generate_answer
from roi_model.loading import load_pretrained
from roi_model.modeling import RegionLLMForCausalLM
from roi_model.presets import gpt4roi_7b_config, tiny_config
from roi_model.processing import IGNORE_INDEX, check_boxes, load_image
from roi_model.word_tokenizer import train_word_tokenizer

CAPTION = "Describe <region1> briefly."


def encode_question(processor, question, boxes):
    encoded = processor.encode([("user", question)], len(boxes), generation=True)
    return torch.tensor([encoded.input_ids]), [check_boxes(boxes)[encoded.box_order]]


@pytest.mark.parametrize("kind", ["convnext", "clip", "siglip"])
def test_shapes_through_every_stage(kind):
    model, processor = make_tiny(kind)
    config = model.config
    pixels = processor.pixel_values(noise_image(90, 60))[None]
    assert pixels.shape == (1, 3, config.image_size, config.image_size)

    vision = model.vision_tower(pixels)
    assert vision.image_tokens.shape == (1, model.num_image_tokens, model.vision_tower.image_channels)
    assert [level.shape[1] for level in vision.level_maps] == model.vision_tower.region_channels

    features = model.get_image_features(pixels)
    assert features.tokens.shape == (1, model.num_image_tokens, config.text_config.hidden_size)
    for level, native, scale in zip(
        features.pyramid, vision.level_maps, config.region_pyramid_scales, strict=True
    ):
        assert level.shape == (
            1,
            config.region_embed_dim,
            round(native.shape[2] * scale),
            round(native.shape[3] * scale),
        )

    boxes = [check_boxes([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]])]
    assert model.get_region_features(features.pyramid, boxes).shape == (3, config.text_config.hidden_size)

    input_ids, ordered = encode_question(
        processor, "Is <region1> left of <region2>?", [[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9]]
    )
    logits = model(input_ids, pixel_values=pixels, boxes=ordered).logits
    assert logits.shape == (1, input_ids.shape[1], config.text_config.vocab_size)


def region_token(model, processor, box, image):
    features = model.get_image_features(processor.pixel_values(image)[None])
    return model.get_region_features(features.pyramid, [check_boxes([box])])[0]


def test_region_token_moves_with_its_box(tiny):
    model, processor = tiny
    image = noise_image(120, 80)
    with torch.no_grad():
        here = region_token(model, processor, [0.1, 0.1, 0.3, 0.3], image)
        same = region_token(model, processor, [0.1, 0.1, 0.3, 0.3], image)
        moved = region_token(model, processor, [0.6, 0.5, 0.8, 0.7], image)
    assert torch.equal(here, same)
    assert (here - moved).abs().max() > 1e-3


def test_position_embedding_alone_moves_the_token_on_a_blank_image():
    """On a uniform image only the box position embedding can tell two boxes of the same size apart."""
    model, processor = make_tiny("convnext")
    blank = Image.new("RGB", (64, 64), "gray")
    with torch.no_grad():
        a = region_token(model, processor, [0.1, 0.1, 0.3, 0.3], blank)
        b = region_token(model, processor, [0.6, 0.6, 0.8, 0.8], blank)
    assert (a - b).abs().max() > 1e-3
    no_position, processor = make_tiny("convnext", use_region_position=False)
    with torch.no_grad():
        pyramid = no_position.get_image_features(processor.pixel_values(blank)[None]).pyramid
        # a uniform pyramid (away from the coordinate channels' influence) gives near-equal tokens
        tokens = no_position.get_region_features(
            pyramid, [check_boxes([[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.8, 0.8]])]
        )
    assert (tokens[0] - tokens[1]).abs().max() < (a - b).abs().max()


def test_region2_receives_the_second_box(tiny):
    model, processor = tiny
    first, second = [0.05, 0.05, 0.35, 0.35], [0.55, 0.5, 0.95, 0.9]
    input_ids, ordered = encode_question(processor, "Is <region2> left of <region1>?", [first, second])
    assert torch.equal(ordered[0], check_boxes([second, first]))
    image = noise_image(100, 100)
    with torch.no_grad():
        features = model.get_image_features(processor.pixel_values(image)[None])
        tokens = model.get_region_features(features.pyramid, ordered)
        embeds = model.embed_inputs(input_ids, features.tokens, tokens)
    bbox_positions = (input_ids[0] == model.config.bbox_token_id).nonzero().squeeze(1)
    text = processor.tokenizer.convert_ids_to_tokens(input_ids[0, bbox_positions - 1])
    assert text == ["region2", "region1"]
    with torch.no_grad():
        second_token, first_token = (region_token(model, processor, box, image) for box in (second, first))
    assert torch.allclose(embeds[0, bbox_positions[0]], second_token, atol=1e-5)
    assert torch.allclose(embeds[0, bbox_positions[1]], first_token, atol=1e-5)
    assert not torch.allclose(second_token, first_token, atol=1e-3)


def test_a_region_mentioned_again_gets_no_new_token(tiny):
    _, processor = tiny
    turns = [
        ("user", "What colour is <region1>?"),
        ("assistant", "red"),
        ("user", "Is <region1> left of <region2>?"),
        ("assistant", "yes"),
    ]
    encoded = processor.encode(turns, 2, generation=False)
    assert encoded.box_order == [0, 1]
    assert encoded.input_ids.count(processor.tokenizer.convert_tokens_to_ids("<bbox>")) == 2


def targets(processor, encoded):
    return processor.tokenizer.convert_ids_to_tokens(
        [
            token
            for token, label in zip(encoded.input_ids, encoded.labels, strict=True)
            if label != IGNORE_INDEX
        ]
    )


def test_loss_only_on_answers_and_stop_marker_chat_template(tiny):
    _, processor = tiny
    turns = [
        ("user", CAPTION),
        ("assistant", "a large red circle"),
        ("user", "What colour is <region1>?"),
        ("assistant", "red"),
    ]
    encoded = processor.encode(turns, 1, generation=False)
    assert targets(processor, encoded) == ["a", "large", "red", "circle", "</s>", "red", "</s>"]
    # every target label is the token at its position: nothing shifted or mislabeled
    assert all(
        label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels, strict=True)
    )


def test_loss_masking_gpt4roi_v0_template():
    tokenizer = train_word_tokenizer([*TEXTS, "a chat ### human assistant :"])
    model, processor = build_model(
        tiny_config("convnext", template="gpt4roi_v0", system_prompt="a chat", stop_strings=["###"]),
        tokenizer,
    )
    turns = [
        ("user", CAPTION),
        ("assistant", "a large red circle"),
        ("user", "What colour is <region1>?"),
        ("assistant", "red"),
    ]
    encoded = processor.encode(turns, 1, generation=False)
    answer = ["#", "#", "#", "assistant", ":"]
    assert targets(processor, encoded) == [
        *answer,
        "a",
        "large",
        "red",
        "circle",
        "#",
        "#",
        "#",
        *answer,
        "red",
        "#",
        "#",
        "#",
    ]
    prompt = processor.encode([("user", CAPTION)], 1, generation=True)
    assert processor.tokenizer.convert_ids_to_tokens(prompt.input_ids)[-3:] == ["#", "#", "#"]
    assert all(label == IGNORE_INDEX for label in prompt.labels)
    assert processor.template.clean_answer(" Assistant: a red circle\n") == "a red circle"
    del model


def test_variable_regions_batch_with_padding_matches_single_examples(tiny, tmp_path):
    model, processor = tiny
    examples = [
        (noise_image(80, 60, 1), [[0.1, 0.1, 0.5, 0.5]], [("user", CAPTION), ("assistant", "a red circle")]),
        (
            noise_image(60, 90, 2),
            [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]],
            [
                ("user", "Which is larger, <region1> or <region2>?"),
                ("assistant", "region2"),
                ("user", CAPTION),
                ("assistant", "a small blue square"),
            ],
        ),
    ]
    batch = training_batch(processor, tmp_path, examples)
    assert (
        batch["input_ids"].shape[0] == 2
        and batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    )
    with torch.no_grad():
        batched = model(**batch).loss
        singles = [model(**training_batch(processor, tmp_path, [example])) for example in examples]
    # the batch loss is the token-weighted mean of the single losses
    counts = [int((labels[1:] != IGNORE_INDEX).sum()) for labels in batch["labels"]]
    expected = sum(out.loss * count for out, count in zip(singles, counts, strict=True)) / sum(counts)
    assert torch.allclose(batched, expected, atol=1e-5)


def test_save_and_load_give_bit_identical_logits(tiny, tmp_path):
    model, processor = tiny
    save_pretrained(model, processor, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded, loaded_processor = load_pretrained(tmp_path)
    input_ids, boxes = encode_question(processor, CAPTION, [[0.2, 0.2, 0.6, 0.7]])
    assert torch.equal(input_ids, encode_question(loaded_processor, CAPTION, [[0.2, 0.2, 0.6, 0.7]])[0])
    pixels = processor.pixel_values(noise_image(70, 50))[None]
    with torch.no_grad():
        assert torch.equal(
            model(input_ids, pixel_values=pixels, boxes=boxes).logits,
            loaded(input_ids, pixel_values=pixels, boxes=boxes).logits,
        )


def shape_image(colour: str, box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", (96, 96), (128, 128, 128))
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny model that learned to caption one coloured square per image (the learning smoke test)."""
    model, processor = make_tiny("convnext")
    examples = [
        (
            shape_image(colour, box),
            [[b / 96 for b in box]],
            [("user", CAPTION), ("assistant", f"a large {colour} square")],
        )
        for colour, box in [
            ("red", (10, 10, 50, 50)),
            ("blue", (40, 30, 90, 80)),
            ("green", (5, 40, 45, 90)),
            ("red", (50, 5, 92, 47)),
        ]
    ]
    batch = training_batch(processor, tmp_path_factory.mktemp("squares"), examples)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return model, processor, losses


def test_learning_smoke_loss_falls_by_more_than_half(trained_tiny):
    _, _, losses = trained_tiny
    assert losses[-1] < losses[0] / 2


def test_generation_answers_and_stops_on_stop_string(trained_tiny):
    model, processor, _ = trained_tiny
    image, box = shape_image("blue", (40, 30, 90, 80)), [40 / 96, 30 / 96, 90 / 96, 80 / 96]
    full = generate_answer(model, processor, image, [box], CAPTION, GenerationOptions(max_new_tokens=8))
    assert full.text == "a large blue square"
    assert full.token_ids[-1] == processor.tokenizer.eos_token_id and full.score < 0
    assert not full.truncated
    cut = generate_answer(model, processor, image, [box], CAPTION, GenerationOptions(max_new_tokens=2))
    assert (cut.text, cut.truncated) == ("a large", True)  # max_new_tokens ended it: the answer says so
    stopped = generate_answer(
        model, processor, image, [box], CAPTION, GenerationOptions(max_new_tokens=8, stop_strings=("blue",))
    )
    assert stopped.text == "a large"
    assert len(stopped.token_ids) == 3 and not stopped.truncated
    sampled = generate_answer(
        model,
        processor,
        image,
        [box],
        CAPTION,
        GenerationOptions(max_new_tokens=8, do_sample=True, temperature=0.01),
    )
    assert sampled.text == "a large blue square"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("boxes", "question", "message"),
    [
        ([[0.1, 0.1, 1.2, 0.5]], CAPTION, "lies outside the image"),
        ([[-0.3, 0.1, 0.2, 0.5]], CAPTION, "lies outside the image"),
        ([[0.4, 0.1, 0.4, 0.5]], CAPTION, "has zero area"),
        ([[0.4, 0.5, 0.6, 0.2]], CAPTION, "has zero area"),
        (
            [[0.1, 0.1, 0.2, 0.2]],
            "Is <region1> left of <region2>?",
            "<region2> refers to box 2, but only 1 box given",
        ),
        ([[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.5, 0.5]], CAPTION, "box 2 is never referenced"),
        ([[0.1, 0.1, 0.2]], CAPTION, "has four numbers x1, y1, x2, y2, got 3"),
        ([[0.1, 0.1, 0.2, 0.2]], "   ", "the question is empty"),
    ],
)
def test_bad_input_raises_a_clear_message(tiny, boxes, question, message):
    model, processor = tiny
    with pytest.raises(ValueError, match=message):
        generate_answer(model, processor, noise_image(50, 50), boxes, question)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "image is empty"),
        (b"this is not an image", "not an image in a supported format"),
        (png_bytes(noise_image(40, 40))[:60], "broken image data"),
    ],
)
def test_bad_images_raise_a_clear_message(data, message):
    with pytest.raises(ValueError, match=message):
        load_image(data)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "white")
    ImageDraw.Draw(image).rectangle((0, 0, 9, 19), fill="red")  # red on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the red strip ends up on top
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    shown = load_image(buffer.getvalue())
    assert shown.size == (20, 40)
    red, _, blue = shown.getpixel((10, 2))
    assert red > 200 and blue < 60


def bilinear(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Bilinear sample of a (C, H, W) map at continuous pixel-centre coordinates, zero outside [-1, H]."""
    height, width = feature.shape[1:]
    if y < -1 or y > height or x < -1 or x > width:
        return torch.zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    ly, lx = y - y0, x - x0
    return (
        feature[:, y0, x0] * (1 - ly) * (1 - lx)
        + feature[:, y0, x1] * (1 - ly) * lx
        + feature[:, y1, x0] * ly * (1 - lx)
        + feature[:, y1, x1] * ly * lx
    )


def reference_roi_align(feature, box, scale, output, samples):
    x1, y1, x2, y2 = (value * scale - 0.5 for value in box)  # aligned=True: pixel centres at +0.5
    bin_h, bin_w = (y2 - y1) / output, (x2 - x1) / output
    result = torch.zeros(feature.shape[0], output, output)
    for i in range(output):
        for j in range(output):
            points = [
                bilinear(
                    feature, y1 + (i + (a + 0.5) / samples) * bin_h, x1 + (j + (b + 0.5) / samples) * bin_w
                )
                for a in range(samples)
                for b in range(samples)
            ]
            result[:, i, j] = torch.stack(points).mean(0)
    return result


def test_roi_align_use_matches_direct_bilinear_sampling():
    from roi_model.region_encoder import boxes_to_rois, multi_level_roi_align

    torch.manual_seed(1)
    levels = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)]
    boxes = [torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0], [0.33, 0.4, 0.41, 0.5]])]
    image_size = 32
    pooled = multi_level_roi_align(
        levels, boxes_to_rois(boxes, image_size), image_size, output_size=3, sampling_ratio=2
    )
    for level, result in zip(levels, pooled, strict=True):
        scale = level.shape[-1] / image_size
        for index, box in enumerate(boxes[0].tolist()):
            expected = reference_roi_align(level[0], [value * image_size for value in box], scale, 3, 2)
            assert torch.allclose(result[index], expected, atol=1e-5)


def test_coordinate_channels_run_along_their_own_axis():
    from roi_model.region_encoder import add_coordinate_channels

    with_coords = add_coordinate_channels(torch.zeros(2, 3, 3, 5))  # 3 rows, 5 columns: not square

    assert with_coords.shape == (2, 5, 3, 5)
    assert torch.equal(with_coords[:, :3], torch.zeros(2, 3, 3, 5))
    x, y = with_coords[0, 3], with_coords[0, 4]
    assert torch.allclose(
        x, torch.linspace(-1, 1, 5).expand(3, 5)
    )  # x grows left to right, same on every row
    assert torch.allclose(y, torch.linspace(-1, 1, 3)[:, None].expand(3, 5))  # y grows top to bottom


def test_an_asymmetric_box_pools_its_own_position_from_the_coordinate_channels():
    """A wide box near the top left: pooled x and y coordinates are the box centre's, not swapped."""
    from roi_model.region_encoder import add_coordinate_channels, boxes_to_rois, multi_level_roi_align

    image_size = 64
    coords = add_coordinate_channels(torch.zeros(1, 0, 16, 16))
    box = [0.05, 0.55, 0.45, 0.75]  # x from 0.05 to 0.45, y from 0.55 to 0.75
    [pooled] = multi_level_roi_align(
        [coords],
        boxes_to_rois([torch.tensor([box])], image_size),
        image_size,
        output_size=4,
        sampling_ratio=2,
    )

    pooled = pooled[0]  # the one box: (x, y) channels x 4 x 4 bins

    # The channels span -1..1 over pixel centres 0.5..15.5 of the 16-pixel grid.
    def channel_value(fraction: float) -> float:
        return -1 + 2 * (fraction * 16 - 0.5) / 15

    centre_x, centre_y = pooled[0].mean().item(), pooled[1].mean().item()
    assert centre_x == pytest.approx(channel_value(0.25), abs=1e-4)
    assert centre_y == pytest.approx(channel_value(0.65), abs=1e-4)
    # Left to right within the box x grows and y does not; top to bottom the other way round.
    assert pooled[0, 0, -1] > pooled[0, 0, 0] and pooled[1, 0, -1] == pytest.approx(pooled[1, 0, 0].item())
    assert pooled[1, -1, 0] > pooled[1, 0, 0] and pooled[0, -1, 0] == pytest.approx(pooled[0, 0, 0].item())


def test_gpt4roi_7b_region_encoder_has_the_paper_shapes():
    with torch.device("meta"):
        model = RegionLLMForCausalLM(gpt4roi_7b_config())
    shapes = {name: tuple(p.shape) for name, p in model.region_encoder.named_parameters()}
    assert shapes["flatten_linear.weight"] == (1024, 1024 * 14 * 14)
    assert shapes["fusion.input_convs.0.weight"] == (1024, 1026, 1, 1)
    assert (
        shapes["fusion.rounds.4.conv.weight"] == (1024, 1024, 3, 3)
        and "fusion.rounds.4.conv.bias" not in shapes
    )
    assert shapes["level_convs.3.weight"] == (1024, 1024, 3, 3)
    assert shapes["project.weight"] == (4096, 1024)
    assert len(model.region_encoder.fusion.rounds) == 5 and model.num_image_tokens == 256


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config("clip", region_fusion_rounds=3)
    config.save_pretrained(tmp_path)
    assert RegionLLMConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="region_pyramid_scales has 2 entries"):
        tiny_config("clip", region_pyramid_scales=[1.0, 1.0])


def test_cli_describe_prints_one_json_line(trained_tiny, tmp_path, capsys):
    model, processor, _ = trained_tiny
    save_pretrained(model, processor, tmp_path / "model")
    shape_image("green", (5, 40, 45, 90)).save(tmp_path / "image.png")
    box = ",".join(str(round(v / 96, 4)) for v in (5, 40, 45, 90))
    assert (
        cli_main(
            [
                "describe",
                "--model",
                str(tmp_path / "model"),
                "--image",
                str(tmp_path / "image.png"),
                "--box",
                box,
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["answers"][0]["text"] == "a large green square"
    assert (
        cli_main(
            [
                "describe",
                "--model",
                str(tmp_path / "model"),
                "--image",
                str(tmp_path / "image.png"),
                "--box",
                "0.5,0.5,0.5,0.9",
            ]
        )
        == 2
    )
    assert "zero area" in capsys.readouterr().err
