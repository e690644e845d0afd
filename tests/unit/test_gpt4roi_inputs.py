"""A converted GPT4RoI checkpoint sees its inputs as GPT4RoI did: the same token ids, the same pixels,
the same box for each <bbox>. The references (gpt4roi_reference.py) are written from GPT4RoI's code and
transformers 4.29's slow tokenizer, on a SentencePiece model trained in the test like LLaMA's."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from fake_checkpoints import write_gpt4roi_release
from gpt4roi_reference import official_pixel_values, official_prompt, positional_embeddings, slow_tokenize
from PIL import Image, ImageOps
from tiny_models import noise_image

from roi_model.convert import convert_gpt4roi
from roi_model.loading import load_pretrained
from roi_model.processing import check_boxes, load_image

CONVERSATIONS = {
    "one region": [("user", "What is <region1> doing?")],
    "two regions": [("user", "What is the relationship between <region1> and <region2>?")],
    "punctuation right after <bbox>": [("user", "Describe <region1>, then <region2>: briefly.")],
    "a question mark right after <bbox>": [("user", "Where is <region1>?")],
    "a region at the end": [("user", "Can you give a description of the region mentioned by <region1>")],
    "multi-turn, a repeated mention": [
        ("user", "What is <region1> doing?"),
        ("assistant", "A man is riding a bicycle."),
        ("user", "Is region1 left of <region2>? And <region1>?"),
    ],
    "the <K> shorthand": [("user", "What is <1> doing next to <2>?")],
    "digits and spaces": [("user", "Are there  12 people near <region1> ,  3.5 metres away?")],
}
BOXES = [[0.10, 0.15, 0.55, 0.70], [0.50, 0.30, 0.95, 0.90]]


@pytest.fixture(scope="module")
def gpt4roi(tmp_path_factory):
    release = write_gpt4roi_release(tmp_path_factory.mktemp("release"))
    out = tmp_path_factory.mktemp("converted") / "gpt4roi"
    convert_gpt4roi(release.delta, release.base, release.clip, out, dtype="float32")
    model, processor = load_pretrained(out)
    return release, model, processor


def boxes_named(turns):
    numbers = [
        int(n) for role, text in turns if role == "user" for n in re.findall(r"<(?:region)?(\d+)>", text)
    ]
    return BOXES[: max(numbers)]


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_token_ids_are_those_gpt4roi_trained_with(gpt4roi, case):
    release, _, processor = gpt4roi
    turns = CONVERSATIONS[case]
    encoded = processor.encode(turns, len(boxes_named(turns)), generation=True)
    expected = slow_tokenize(release.sentencepiece, release.token_ids, official_prompt(turns))
    assert encoded.input_ids == expected


def test_one_tokenizer_call_on_the_whole_text_would_differ(gpt4roi):
    """What the converted model saw before: an extra "▁" token before <im_start> and before every <bbox>."""
    release, _, processor = gpt4roi
    text = official_prompt([("user", "Is it <region1>?")])
    whole = processor.tokenizer.convert_ids_to_tokens(processor.tokenizer(text).input_ids)
    slow = processor.tokenizer.convert_ids_to_tokens(
        slow_tokenize(release.sentencepiece, release.token_ids, text)
    )
    for token in ("<im_start>", "<bbox>"):
        assert whole[whole.index(token) - 1] == "▁" and slow[slow.index(token) - 1] != "▁"


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 300), (224, 224), (90, 50), (225, 224)])
def test_non_square_images_are_preprocessed_as_gpt4roi_demo_does(gpt4roi, size):
    _, _, processor = gpt4roi
    image = noise_image(*size, seed=sum(size))
    expected = official_pixel_values(image)
    assert processor.pixel_values(image).shape == (3, 224, 224)
    torch.testing.assert_close(processor.pixel_values(image), expected, atol=1e-5, rtol=0)


def test_an_exif_rotated_jpeg_is_preprocessed_as_displayed(gpt4roi):
    _, _, processor = gpt4roi
    stored = noise_image(320, 200, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
    assert displayed.size == (200, 320)
    ours = processor.pixel_values(load_image(buffer.getvalue()))
    torch.testing.assert_close(ours, official_pixel_values(displayed), atol=1e-5, rtol=0)


def test_our_models_keep_one_bicubic_stretch(gpt4roi):
    """Our own models keep the one bicubic stretch they were trained with (config.image_resize)."""
    _, model, processor = gpt4roi
    image = noise_image(300, 120, seed=5)
    bicubic = np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC))
    stretched = processor.normalize_pixels(torch.from_numpy(bicubic.copy()).permute(2, 0, 1))
    assert (processor.pixel_values(image) - stretched).abs().max() > 0.05
    model.config.image_resize = "stretch"
    try:
        torch.testing.assert_close(processor.pixel_values(image), stretched, atol=0, rtol=0)
    finally:
        model.config.image_resize = "shortest_edge_then_stretch"


def embedding_sequence(model, processor, question, boxes, image):
    encoded = processor.encode([("user", question)], len(boxes), generation=True)
    input_ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        features = model.get_image_features(processor.pixel_values(image)[None])
        regions = model.get_region_features(features.pyramid, [check_boxes(boxes)[encoded.box_order]])
        return encoded, model.embed_inputs(input_ids, features.tokens, regions)[0], features


@pytest.mark.parametrize(
    "question", ["Is <region2> left of <region1>?", "Is <2> left of <1>?", "Is <region1> left of <region2>?"]
)
def test_the_kth_bbox_reads_the_kth_drawn_box(gpt4roi, question):
    release, model, processor = gpt4roi
    image = noise_image(300, 200, seed=7)
    encoded, ours, features = embedding_sequence(model, processor, question, BOXES, image)
    input_ids = torch.tensor(encoded.input_ids)
    with torch.no_grad():
        drawn_order = model.get_region_features(features.pyramid, [check_boxes(BOXES)])
        token_embeddings = model.get_input_embeddings()(input_ids)
    token_embeddings[input_ids == release.token_ids["<im_patch>"]] = features.tokens[0]
    expected = positional_embeddings(
        token_embeddings, encoded.input_ids, release.token_ids["<bbox>"], drawn_order
    )
    assert torch.equal(ours, expected)
    assert (drawn_order[0] - drawn_order[1]).abs().max() > 0.1  # the two boxes' tokens differ


def test_our_models_read_box_k_for_region_k(gpt4roi):
    release, model, processor = gpt4roi
    image = noise_image(300, 200, seed=7)
    positional = embedding_sequence(model, processor, "Is <region2> left of <region1>?", BOXES, image)[1]
    model.config.region_binding = "by_number"
    try:
        encoded, by_number, _ = embedding_sequence(
            model, processor, "Is <region2> left of <region1>?", BOXES, image
        )
    finally:
        model.config.region_binding = "by_position"
    assert encoded.box_order == [1, 0]
    bbox = [index for index, token in enumerate(encoded.input_ids) if token == release.token_ids["<bbox>"]]
    torch.testing.assert_close(by_number[bbox[0]], positional[bbox[1]])
    assert not torch.equal(by_number, positional)
