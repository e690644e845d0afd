"""The Qwen2.5-VL and Qwen3-VL region models on tiny random configs (tests/unit/tiny_qwen.py)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from tiny_qwen import tiny_qwen

from roi_contract.images import decode_displayed
from roi_contract.records import TrainingRecord
from roi_model.engine import ImageRequest, RegionQuery
from roi_model.families import UnsupportedModel, detect_family, load_region_model
from roi_model.generation import GenerationOptions
from roi_model.qwen_vl import box_coordinates, coordinates_to_box
from roi_model.region_model import RegionModel

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request):
    return tiny_qwen(request.param)


def test_implements_the_interface(qwen):
    assert isinstance(qwen, RegionModel)
    assert qwen.processor.tokenizer is qwen.tokenizer


def test_one_and_two_regions_in_the_prompt(qwen):
    image = Image.new("RGB", (200, 100), "white")
    encoded = qwen.encode_image(image)
    one = qwen.prompt("Describe <region1> .", [[0.1, 0.2, 0.5, 0.6]], encoded)
    two = qwen.prompt(
        "is <region1> left of <region2> ?", [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]], encoded
    )
    width, height = encoded["resized"]
    if qwen.family == "qwen2_5_vl":  # absolute pixels of the resized image (smart_resize, multiples of 28)
        assert (width, height) == (196, 84) or (width % 28, height % 28) == (0, 0)
        first = [round(0.1 * width), round(0.2 * height), round(0.5 * width), round(0.6 * height)]
        whole = [0, 0, width, height]
    else:  # a 0-1000 grid
        first, whole = [100, 200, 500, 600], [0, 0, 1000, 1000]
    region = "the region [{}, {}, {}, {}]"
    assert one.endswith(f"Describe {region.format(*first)} .<|im_end|>\n<|im_start|>assistant\n")
    assert f"is {region.format(*first)} left of {region.format(*whole)} ?<|im_end|>" in two
    assert one.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")

    # token ids: the processor's own expansion of one <|image_pad|> gives the same ids
    ids = qwen.tokenizer(one, add_special_tokens=False)["input_ids"]
    compact = one.replace("<|image_pad|>" * qwen.image_token_count(encoded), "<|image_pad|>")
    reference = qwen.processor(text=[compact], images=[image], return_tensors="pt")
    assert ids == reference["input_ids"][0].tolist()
    assert torch.equal(reference["image_grid_thw"], encoded["image_grid_thw"])
    pad = qwen.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == int(encoded["image_grid_thw"].prod()) // 4
    digits = [qwen.tokenizer.convert_ids_to_tokens(i) for i in ids[-20:]]
    assert "".join(digits).count(",") == 3


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), "gray")
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize(
    "size, orientation, pixel_box",
    [
        ((1200, 100), None, [0, 10, 300, 90]),  # very wide: max pixels shrink it
        ((60, 900), None, [5, 850, 60, 900]),  # very tall, box at the bottom border
        ((300, 200), 6, [20, 30, 150, 290]),  # EXIF rotated: displayed 200 x 300
        ((40, 30), None, [0, 0, 40, 30]),  # tiny: min pixels enlarge it
    ],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_box_maps_back_to_the_annotated_pixels(family, size, orientation, pixel_box):
    model = tiny_qwen(family, max_pixels=64 * 28 * 28)
    image = decode_displayed(_jpeg(*size, orientation))
    if orientation == 6:
        assert image.size == (size[1], size[0])
    width, height = image.size
    box = [pixel_box[0] / width, pixel_box[1] / height, pixel_box[2] / width, pixel_box[3] / height]
    encoded = model.encode_image(image)
    coordinates = box_coordinates(family, box, encoded["resized"])
    assert f"the region [{', '.join(map(str, coordinates))}]" in model.prompt(
        "Describe <region1> .", [box], encoded
    )
    back = coordinates_to_box(family, coordinates, encoded["resized"])
    cell = (1 / encoded["resized"][0], 1 / encoded["resized"][1]) if family == "qwen2_5_vl" else (1e-3, 1e-3)
    for axis, (got, wanted) in enumerate(zip(back, box, strict=True)):
        # within half a coordinate step of the annotator's box, in displayed pixels
        side = width if axis % 2 == 0 else height
        assert abs(got - wanted) * side <= 0.5 * cell[axis % 2] * side + 1e-9
    if family == "qwen2_5_vl":
        resized_w, resized_h = encoded["resized"]
        assert resized_w % 28 == 0 and resized_h % 28 == 0
        grid = encoded["image_grid_thw"][0].tolist()
        assert [grid[1] * 14, grid[2] * 14] == [resized_h, resized_w]


def _plain_generate(qwen, image, question, boxes, max_new_tokens):
    encoded = qwen.encode_image(image)
    prompt = qwen.prompt(question, boxes, encoded)
    compact = prompt.replace("<|image_pad|>" * qwen.image_token_count(encoded), "<|image_pad|>")
    inputs = qwen.processor(text=[compact], images=[image], return_tensors="pt")
    output = qwen.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def _requests():
    wide, tall = Image.new("RGB", (240, 80), "red"), Image.new("RGB", (64, 200), "blue")
    for x in range(0, 240, 7):
        wide.putpixel((x, 40), (0, 255, x))
    options = GenerationOptions(max_new_tokens=6)
    return [
        ImageRequest(
            wide,
            [
                RegionQuery("Describe <region1> .", [[0.1, 0.1, 0.4, 0.9]]),
                RegionQuery("is <region1> left of <region2> ?", [[0.0, 0.0, 0.2, 0.5], [0.6, 0.2, 1.0, 1.0]]),
            ],
            options,
        ),
        ImageRequest(tall, [RegionQuery("what is in <region1> ?", [[0.2, 0.7, 0.9, 1.0]])], options),
    ]


def test_batch_answers_equal_plain_generate(qwen):
    requests = _requests()
    answers = qwen.answer(requests)
    assert [len(a) for a in answers] == [2, 1]
    eos = qwen.eos_ids()
    for request, request_answers in zip(requests, answers, strict=True):
        for query, answer in zip(request.queries, request_answers, strict=True):
            plain = _plain_generate(qwen, request.image, query.question, query.boxes, 6)
            length = next((i + 1 for i, token in enumerate(plain) if token in eos), len(plain))
            assert answer.token_ids == plain[:length]
            assert answer.score <= 0
            assert answer.truncated == (plain[length - 1] not in eos)


def test_bad_question_raises_before_work(qwen):
    with pytest.raises(ValueError):
        qwen.answer(
            [ImageRequest(Image.new("RGB", (50, 50)), [RegionQuery("Describe <region2> .", [[0, 0, 1, 1]])])]
        )


def test_save_reload_answers_the_same(qwen, tmp_path):
    qwen.save_pretrained(tmp_path)
    assert detect_family(tmp_path) == qwen.family
    reloaded = load_region_model(tmp_path, device="cpu")
    assert reloaded.family == qwen.family
    requests = _requests()
    assert [[a.token_ids for a in r] for r in reloaded.answer(requests)] == [
        [a.token_ids for a in r] for r in qwen.answer(requests)
    ]


def test_family_detection_refuses_with_a_reason(tmp_path):
    with pytest.raises(UnsupportedModel, match=r"no config\.json"):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        UnsupportedModel, match=r"'bert'.*supported: florence2, qwen2_5_vl, qwen3_vl, region_llm"
    ):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModel, match="JSON"):
        detect_family(tmp_path)


def test_training_examples_label_only_the_answer(qwen):
    record = TrainingRecord.model_validate(
        {
            "id": "t1",
            "image": "a.png",
            "width": 200,
            "height": 100,
            "regions": [[20, 10, 100, 60], [120, 0, 200, 100]],
            "conversations": [
                {"from": "human", "value": "Describe <region1> ."},
                {"from": "gpt", "value": "a red circle"},
                {"from": "human", "value": "is <region1> left of <region2> ?"},
                {"from": "gpt", "value": "yes"},
            ],
        }
    )
    examples = qwen.training_examples(record, Image.new("RGB", (200, 100)))
    assert len(examples) == 2
    labelled = [t for t in examples[0].labels[0].tolist() if t != -100]
    assert qwen.tokenizer.decode(labelled, skip_special_tokens=True) == "a red circle"
    assert labelled[-1] == qwen.tokenizer.convert_tokens_to_ids("<|im_end|>")
    loss = qwen.model(**examples[0].inputs, labels=examples[0].labels).loss
    assert torch.isfinite(loss)


def test_roi_model_describe_speaks_the_interface(qwen, tmp_path, capsys):
    from roi_model.cli import main

    qwen.save_pretrained(tmp_path / "model")
    Image.new("RGB", (120, 80), "blue").save(tmp_path / "photo.png")
    argv = ["describe", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "photo.png")]
    assert main([*argv, "--box", "0.1,0.2,0.5,0.6", "--box", "0,0,1,1", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["family"] == qwen.family
    assert [answer["boxes"] for answer in printed["answers"]] == [
        [[0.1, 0.2, 0.5, 0.6]],
        [[0.0, 0.0, 1.0, 1.0]],
    ]
