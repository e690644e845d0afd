"""The synthetic shapes world: determinism, geometry, EXIF handling, questions and exports."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from roi_model import synthetic
from roi_model.synthetic import (
    COLOURS,
    QUESTION_KINDS,
    SHAPES,
    SIZES,
    format_caption,
    generate_world,
    parse_caption,
)

SEED = 11
IMAGES = 40
SATURATED_CHROMA = 70  # object pixels have chroma >= ~120, background pixels <= ~50
PROTOTYPES = np.array([synthetic.COLOUR_PROTOTYPES[name] for name in COLOURS], dtype=np.float32)
TAG = re.compile(r"<region(\d+)>")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, list[dict], synthetic.WorldSummary]:
    out = tmp_path_factory.mktemp("world")
    summary = generate_world(out, IMAGES, SEED)
    return out, read_records(out), summary


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def displayed(out: Path, record: dict) -> np.ndarray:
    with Image.open(out / record["image"]) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.float32)


def colour_names(pixels: np.ndarray) -> np.ndarray:
    """Nearest colour prototype per pixel, or "" where the pixel is not saturated (background)."""
    distances = np.linalg.norm(pixels[..., None, :] - PROTOTYPES, axis=-1)
    names = np.asarray(COLOURS)[distances.argmin(axis=-1)]
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    return np.where(chroma > SATURATED_CHROMA, names, "")


def turns(record: dict) -> list[tuple[str, str, str]]:
    conversation = record["conversations"]
    assert [turn["from"] for turn in conversation] == ["human", "gpt"] * (len(conversation) // 2)
    return [
        (h["kind"], h["value"], g["value"])
        for h, g in zip(conversation[::2], conversation[1::2], strict=True)
    ]


def tags(question: str) -> list[int]:
    return [int(k) - 1 for k in TAG.findall(question)]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(world, tmp_path):
    out, records, _ = world
    again = tmp_path / "again"
    generate_world(again, IMAGES, SEED)
    assert (again / "data.jsonl").read_bytes() == (out / "data.jsonl").read_bytes()
    for record in records:
        assert (again / record["image"]).read_bytes() == (out / record["image"]).read_bytes()

    other = tmp_path / "other"
    generate_world(other, 4, SEED + 1)
    other_records = read_records(other)
    assert [r["regions"] for r in other_records] != [r["regions"] for r in records[:4]]
    for mine, theirs in zip(records[:4], other_records, strict=True):
        assert (out / mine["image"]).read_bytes() != (other / theirs["image"]).read_bytes()


def test_image_i_does_not_depend_on_how_many_images_are_made(world, tmp_path):
    out, records, _ = world
    generate_world(tmp_path, 3, SEED)
    for mine, fewer in zip(records[:3], read_records(tmp_path), strict=True):
        assert (mine["regions"], mine["objects"]) == (fewer["regions"], fewer["objects"])
        assert (tmp_path / fewer["image"]).read_bytes() == (out / mine["image"]).read_bytes()


def test_records_follow_the_training_record_format(world):
    out, records, _ = world
    assert len(records) == IMAGES
    for index, record in enumerate(records):
        assert record["id"] == f"synth:{SEED}:{index}"
        assert re.fullmatch(rf"images/s{SEED}-{index:05d}\.(png|jpg)", record["image"])
        assert (out / record["image"]).is_file()
        assert 2 <= len(record["regions"]) <= 5
        assert len(record["objects"]) == len(record["regions"])
        for x1, y1, x2, y2 in record["regions"]:
            assert all(isinstance(v, int) for v in (x1, y1, x2, y2))
            assert 0 <= x1 < x2 <= record["width"] and 0 <= y1 < y2 <= record["height"]
        for kind, question, _ in turns(record):
            assert kind in QUESTION_KINDS
            assert all(0 <= k < len(record["regions"]) for k in tags(question))
        assert record["source"]["seed"] == SEED and record["source"]["index"] == index


def test_image_sizes_and_aspect_ratios_vary(world):
    _, records, _ = world
    sizes = {(r["width"], r["height"]) for r in records}
    assert len(sizes) > IMAGES // 2
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    for width, height in sizes:
        assert 160 <= width <= 480 and 160 <= height <= 480
        assert max(width, height) <= synthetic.MAX_ASPECT_RATIO * min(width, height)


def test_objects_do_not_overlap_and_keep_a_margin(world):
    _, records, _ = world
    for record in records:
        for (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) in itertools.combinations(record["regions"], 2):
            assert ax2 < bx1 or bx2 < ax1 or ay2 < by1 or by2 < ay1, record["id"]


def test_sizes_are_unambiguous_relative_to_the_shorter_side(world):
    _, records, _ = world
    for record in records:
        shorter = min(record["width"], record["height"])
        for (x1, y1, x2, y2), obj in zip(record["regions"], record["objects"], strict=True):
            side = max(x2 - x1, y2 - y1) / shorter
            low, high = synthetic.SIZE_FRACTIONS[obj["size"]]
            assert low - 0.01 <= side <= high + 0.01, (record["id"], obj, side)


def test_boxes_are_tight_and_only_objects_are_saturated(world):
    out, records, _ = world
    pngs = [r for r in records if r["image"].endswith(".png")]
    assert pngs
    for record in pngs:
        names = colour_names(displayed(out, record))
        inside_any_box = np.zeros(names.shape, dtype=bool)
        for (x1, y1, x2, y2), obj in zip(record["regions"], record["objects"], strict=True):
            inside_any_box[y1:y2, x1:x2] = True
            patch = names[y1:y2, x1:x2] == obj["colour"]
            # The shape touches all four box edges...
            assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
            # ...and nothing saturated lies just outside them.
            height, width = names.shape
            if y1 > 0:
                assert not names[y1 - 1, x1:x2].any()
            if y2 < height:
                assert not names[y2, x1:x2].any()
            if x1 > 0:
                assert not names[y1:y2, x1 - 1].any()
            if x2 < width:
                assert not names[y1:y2, x2].any()
        assert not names[~inside_any_box].any(), f"{record['id']}: saturated background pixels"


def test_exif_images_display_the_world_after_exif_transpose(world):
    out, records, _ = world
    jpegs = [r for r in records if r["image"].endswith(".jpg")]
    assert jpegs and len(jpegs) < IMAGES // 2
    for record in jpegs:
        with Image.open(out / record["image"]) as image:
            orientation = image.getexif().get(0x0112)
            assert orientation in (3, 6, 8) and orientation == record["source"]["exif_orientation"]
            stored_size = image.size
        expected = (record["width"], record["height"])
        assert stored_size == (expected if orientation == 3 else expected[::-1])
        pixels = displayed(out, record)
        assert pixels.shape[:2] == (record["height"], record["width"])
        for (x1, y1, x2, y2), obj in zip(record["regions"], record["objects"], strict=True):
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            centre = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(axis=0)
            assert colour_names(centre[None, :])[0] == obj["colour"], (record["id"], obj)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_every_orientation_is_stored_so_that_exif_transpose_restores_it(tmp_path, orientation):
    (tmp_path / "images").mkdir()
    shown = np.zeros((40, 64, 3), dtype=np.uint8)
    shown[:10, :20] = (255, 0, 0)  # a red block in the top-left corner tells every rotation apart
    relative = synthetic._save_image(tmp_path, "probe", Image.fromarray(shown), orientation)
    with Image.open(tmp_path / relative) as image:
        restored = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.int16)
    assert restored.shape == shown.shape
    assert np.abs(restored - shown).mean() < 4


def test_answers_agree_with_objects_and_geometry(world):
    _, records, _ = world
    for record in records:
        objects, regions = record["objects"], record["regions"]
        for kind, question, answer in turns(record):
            regions_asked = tags(question)
            if kind == "caption":
                (k,) = regions_asked
                assert question == f"Describe <region{k + 1}> briefly."
                assert answer == format_caption(objects[k]["size"], objects[k]["colour"], objects[k]["shape"])
            elif kind in ("colour", "shape", "size"):
                (k,) = regions_asked
                assert question == f"What {kind} is <region{k + 1}>?"
                assert answer == objects[k][kind]
            elif kind == "left":
                a, b = regions_asked
                centre_a = (regions[a][0] + regions[a][2]) / 2
                centre_b = (regions[b][0] + regions[b][2]) / 2
                assert abs(centre_a - centre_b) > 0.1 * record["width"]
                assert answer == ("yes" if centre_a < centre_b else "no")
            else:
                a, b = regions_asked
                assert objects[a]["size"] != objects[b]["size"]
                assert answer == f"region{a + 1 if objects[a]['size'] == 'large' else b + 1}"


def test_questions_are_distinct_and_never_leak_answers(world):
    _, records, _ = world
    for record in records:
        asked = [(kind, tuple(tags(question))) for kind, question, _ in turns(record)]
        assert len(asked) == len(set(asked)), record["id"]
        captioned = {regions[0] for kind, regions in asked if kind == "caption"}
        queried = {
            k for kind, regions in asked if kind in ("colour", "shape", "size", "larger") for k in regions
        }
        assert not captioned & queried, record["id"]


def test_every_kind_is_asked_and_yes_no_and_first_second_are_balanced(world):
    _, records, summary = world
    answers = [(kind, question, answer) for record in records for kind, question, answer in turns(record)]
    assert {kind for kind, _, _ in answers} == set(QUESTION_KINDS)
    left = [answer for kind, _, answer in answers if kind == "left"]
    assert abs(left.count("yes") - left.count("no")) <= 1 and len(left) >= 10
    larger_first = [
        answer == f"region{tags(question)[0] + 1}" for kind, question, answer in answers if kind == "larger"
    ]
    assert abs(larger_first.count(True) - larger_first.count(False)) <= 1 and len(larger_first) >= 10
    assert summary.answers["left"] == {"yes": left.count("yes"), "no": left.count("no")}
    assert summary.answers["larger"] == {
        "first": larger_first.count(True),
        "second": larger_first.count(False),
    }


def test_summary_counts_what_was_written(world):
    _, records, summary = world
    assert summary.images == IMAGES
    assert summary.regions == sum(len(r["regions"]) for r in records)
    assert summary.jpeg_images == sum(r["image"].endswith(".jpg") for r in records)
    for kind in QUESTION_KINDS:
        assert summary.kinds[kind] == sum(k == kind for r in records for k, _, _ in turns(r))
    for name, values in synthetic.ATTRIBUTES.items():
        for value in values:
            assert summary.attributes[name][value] == sum(
                obj[name] == value for r in records for obj in r["objects"]
            )
    # Every vocabulary value occurs in a world of this size.
    assert all(count > 0 for counts in summary.attributes.values() for count in counts.values())


def test_exclude_and_include_only_are_honoured(tmp_path):
    excluded = generate_world(tmp_path / "ex", 12, 5, exclude={"colour": {"purple"}, "shape": {"diamond"}})
    assert excluded.attributes["colour"]["purple"] == 0 and excluded.attributes["shape"]["diamond"] == 0
    objects = [obj for r in read_records(tmp_path / "ex") for obj in r["objects"]]
    assert objects and all(o["colour"] != "purple" and o["shape"] != "diamond" for o in objects)

    only = generate_world(tmp_path / "only", 12, 5, include_only={"colour": {"purple"}, "size": {"large"}})
    objects = [obj for r in read_records(tmp_path / "only") for obj in r["objects"]]
    assert objects and all(o["colour"] == "purple" and o["size"] == "large" for o in objects)
    assert only.kinds["larger"] == 0  # no pair of different sizes exists


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"exclude": {"flavour": {"sweet"}}}, "unknown attribute 'flavour'"),
        ({"include_only": {"colour": {"pink"}}}, "unknown values ['pink']"),
        ({"include_only": {"colour": "red"}}, "must be a set of values"),
        ({"exclude": {"size": set(SIZES)}}, "no size value"),
        ({"kind_weights": {"count": 1.0}}, "unknown kinds ['count']"),
        ({"questions_per_image": 0}, "questions_per_image must be >= 1"),
    ],
)
def test_bad_arguments_name_the_problem(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_world(tmp_path, 1, 0, **arguments)


def test_kind_weights_choose_the_kinds(tmp_path):
    # Every image has at least two regions, so two shape questions always fit.
    summary = generate_world(tmp_path, 6, 2, kind_weights={"shape": 1.0}, questions_per_image=2)
    assert summary.kinds["shape"] == 12
    assert sum(summary.kinds.values()) == 12


def test_parse_caption_round_trips_every_caption(world):
    _, records, _ = world
    captions = [answer for r in records for kind, _, answer in turns(r) if kind == "caption"]
    assert captions
    for caption in captions:
        parsed = parse_caption(caption)
        assert parsed is not None and format_caption(**parsed) == caption
    for size, colour, shape in itertools.product(SIZES, COLOURS, SHAPES):
        assert parse_caption(format_caption(size, colour, shape)) == {
            "size": size,
            "colour": colour,
            "shape": shape,
        }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  A Large RED circle. ", {"size": "large", "colour": "red", "shape": "circle"}),
        ("small blue diamond", {"size": "small", "colour": "blue", "shape": "diamond"}),
        ("a large red", None),
        ("a medium red circle", None),
        ("a large red circle and a small blue square", None),
        ("", None),
    ],
)
def test_parse_caption_forgives_case_and_punctuation_but_nothing_else(text, expected):
    assert parse_caption(text) == expected
