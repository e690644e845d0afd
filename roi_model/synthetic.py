"""A synthetic world of coloured shapes, for training and testing the small demo model.

Each image holds 2 to 5 filled shapes on a noisy, muted background. Every object has three
attributes (colour, shape, size class), and every image comes with a multi-turn conversation
about its regions: captions, attribute questions and two-region relations. The world is fully
determined by its seed, so a data set can be rebuilt byte for byte.

`generate_world` writes two things into a folder (devstack/world_tasks.py turns them into Label Studio
tasks):

- ``images/``: PNGs, and about one JPEG in five that carries an EXIF Orientation tag (its pixels
  are stored rotated, so it shows the generated world only after ``ImageOps.exif_transpose``);
- ``data.jsonl``: one spatial-instruction record per image (the training-record format of
  DESIGN.md), with pixel boxes of the *displayed* image, plus ``"objects"`` (attributes aligned
  with ``regions``) and a ``"kind"`` on each human turn, for per-kind evaluation.

Pixel boxes are ``[x1, y1, x2, y2]`` edges: ``x2 - x1`` is the width in pixels, so the last
object column is ``x2 - 1``.

Shapes are chosen to survive the anisotropic stretch to a square model input (images here have
aspect ratios up to 2): a circle becomes an ellipse, a square a rectangle, a triangle stays an
upward triangle and a diamond a rhombus with its corners on the edge midpoints. (A small CNN with
RoIAlign on the stretched 112-px images told all four apart on held-out regions within a few
hundred steps; circle vs diamond is the pair it learns last. `exclude={"shape": {"diamond"}}`
gives the easier three-shape world.) Sizes are relative to the image's shorter side, which the stretch maps onto the full
model input, and the two classes are far apart so that no object is borderline.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

WORLD_VERSION = 1

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}
QUESTION_KINDS = ("caption", "colour", "shape", "size", "left", "larger")

# `{a}` and `{b}` are region tags as written in the text, e.g. "<region3>".
QUESTION_TEMPLATES = {
    "caption": "Describe {a} briefly.",
    "colour": "What colour is {a}?",
    "shape": "What shape is {a}?",
    "size": "What size is {a}?",
    "left": "Is {a} left of {b}?",
    "larger": "Which is larger, {a} or {b}?",
}

# Captions dominate by default: they are what the product asks the model for.
DEFAULT_KIND_WEIGHTS = {"caption": 3.0, "colour": 1.0, "shape": 1.0, "size": 1.0, "left": 1.0, "larger": 1.0}
DEFAULT_QUESTIONS_PER_IMAGE = 6

# Saturated prototypes, far apart in hue; the background is near grey (see _background).
COLOUR_PROTOTYPES = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (230, 210, 30),
    "purple": (145, 50, 190),
    "orange": (240, 135, 20),
}
COLOUR_JITTER = 12
PIXEL_NOISE_STD = 4.0

# Object side as a fraction of the image's shorter side. The gap between the classes (0.17 vs
# 0.30) keeps every object unambiguous.
SIZE_FRACTIONS = {"small": (0.13, 0.17), "large": (0.30, 0.36)}

IMAGE_SIDE_RANGE = (160, 480)
MAX_ASPECT_RATIO = 2.0
OBJECTS_PER_IMAGE = (2, 5)
JPEG_SHARE = 0.2
EXIF_ORIENTATIONS = (3, 6, 8)
# `left` is only asked when the horizontal centres differ by more than this share of the width.
LEFT_MIN_SEPARATION = 0.10

_PLACEMENT_TRIES = 60
_EXIF_ORIENTATION_TAG = 0x0112
# Transpose that turns the displayed image into the stored pixels; exif_transpose undoes it.
_STORE_TRANSPOSE = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}
_CAPTION_PATTERN = re.compile(
    r"^\s*(?:an?\s+)?(?P<size>{})\s+(?P<colour>{})\s+(?P<shape>{})\s*\.?\s*$".format(
        "|".join(SIZES), "|".join(COLOURS), "|".join(SHAPES)
    ),
    re.IGNORECASE,
)


@dataclass
class WorldSummary:
    """What a generated world holds: counts per question kind, attribute value and answer."""

    images: int = 0
    regions: int = 0
    jpeg_images: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)
    # "left": yes/no; "larger": whether the larger region was named "first" or "second".
    answers: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Object:
    colour: str
    shape: str
    size: str
    box: tuple[int, int, int, int]  # tight pixel box of the drawn shape in the displayed image

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


def format_caption(size: str, colour: str, shape: str) -> str:
    """The caption the world uses for an object: "a large red circle"."""
    return f"a {size} {colour} {shape}"


def parse_caption(text: str) -> dict[str, str] | None:
    """Read a caption back into {"size", "colour", "shape"}; None if it is not one.

    Case, surrounding whitespace, the article and a final full stop are forgiven, so that model
    output can be scored per attribute.
    """
    match = _CAPTION_PATTERN.match(text)
    if match is None:
        return None
    return {key: match.group(key).lower() for key in ("size", "colour", "shape")}


def generate_world(
    out_dir: Path,
    images: int,
    seed: int,
    *,
    questions_per_image: int = DEFAULT_QUESTIONS_PER_IMAGE,
    kind_weights: Mapping[str, float] | None = None,
    exclude: Mapping[str, set[str]] | None = None,
    include_only: Mapping[str, set[str]] | None = None,
) -> WorldSummary:
    """Write `images` images and data.jsonl into `out_dir`; return what was made.

    The world depends only on `seed` and the attribute restrictions; image i is the same whatever
    `images` is. `exclude` leaves attribute values out entirely ({"colour": {"purple"}});
    `include_only` allows only the given values ({"colour": {"purple"}} makes every object
    purple). `kind_weights` sets how often each question kind is drawn (a kind left out, or
    weighted 0, is never asked). Existing files of the same names are overwritten.
    """
    if images < 0:
        raise ValueError(f"images must be >= 0, got {images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}")
    allowed = _allowed_values(exclude, include_only)
    weights = _kind_weights(kind_weights)

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    summary = WorldSummary(
        kinds=dict.fromkeys(QUESTION_KINDS, 0),
        attributes={name: dict.fromkeys(values, 0) for name, values in ATTRIBUTES.items()},
        answers={"left": {"yes": 0, "no": 0}, "larger": {"first": 0, "second": 0}},
    )
    # World-wide alternation keeps yes/no (and first/second) balanced to within one.
    balance = {"left": itertools.cycle((True, False)), "larger": itertools.cycle((True, False))}
    with open(out_dir / "data.jsonl", "w", encoding="utf-8") as records:
        for index in range(images):
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
            displayed, objects = _draw_image(rng, allowed)
            orientation = int(rng.choice(EXIF_ORIENTATIONS)) if rng.random() < JPEG_SHARE else None
            image_path = _save_image(out_dir, f"s{seed}-{index:05d}", displayed, orientation)
            conversation = _conversation(rng, objects, displayed.width, questions_per_image, weights, balance)
            record = {
                "id": f"synth:{seed}:{index}",
                "image": image_path,
                "width": displayed.width,
                "height": displayed.height,
                "regions": [list(obj.box) for obj in objects],
                "objects": [{"colour": obj.colour, "shape": obj.shape, "size": obj.size} for obj in objects],
                "conversations": conversation,
                "source": {
                    "generator": "roi_model.synthetic",
                    "world_version": WORLD_VERSION,
                    "seed": seed,
                    "index": index,
                    "exif_orientation": orientation,
                },
            }
            records.write(json.dumps(record) + "\n")
            _count(summary, objects, conversation, orientation)
    log.info("synthetic world seed %d: %d images in %s", seed, images, out_dir)
    return summary


def _allowed_values(
    exclude: Mapping[str, set[str]] | None, include_only: Mapping[str, set[str]] | None
) -> dict[str, tuple[str, ...]]:
    for argument, restriction in (("exclude", exclude), ("include_only", include_only)):
        for name, values in (restriction or {}).items():
            if name not in ATTRIBUTES:
                raise ValueError(f"{argument}: unknown attribute {name!r}; known: {sorted(ATTRIBUTES)}")
            if isinstance(values, str):
                raise ValueError(f"{argument}[{name!r}] must be a set of values, not the string {values!r}")
            unknown = set(values) - set(ATTRIBUTES[name])
            if unknown:
                raise ValueError(
                    f"{argument}[{name!r}]: unknown values {sorted(unknown)}; known: {list(ATTRIBUTES[name])}"
                )
    allowed = {}
    for name, values in ATTRIBUTES.items():
        kept = [
            value
            for value in values
            if (include_only is None or name not in include_only or value in include_only[name])
            and value not in (exclude or {}).get(name, set())
        ]
        if not kept:
            raise ValueError(f"exclude/include_only leave no {name} value to draw")
        allowed[name] = tuple(kept)
    return allowed


def _kind_weights(kind_weights: Mapping[str, float] | None) -> dict[str, float]:
    weights = dict(DEFAULT_KIND_WEIGHTS if kind_weights is None else kind_weights)
    unknown = set(weights) - set(QUESTION_KINDS)
    if unknown:
        raise ValueError(f"kind_weights: unknown kinds {sorted(unknown)}; known: {list(QUESTION_KINDS)}")
    if any(weight < 0 for weight in weights.values()) or not any(weights.values()):
        raise ValueError(f"kind_weights must be >= 0 with at least one > 0, got {weights}")
    return {kind: float(weights.get(kind, 0.0)) for kind in QUESTION_KINDS}


def _draw_image(
    rng: np.random.Generator, allowed: Mapping[str, Sequence[str]]
) -> tuple[Image.Image, list[_Object]]:
    width, height = _image_size(rng)
    pixels = _background(rng, width, height)
    objects = _place_objects(rng, width, height, allowed)
    for obj in objects:
        _paint(rng, pixels, obj)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * PIXEL_NOISE_STD
    pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), [obj for obj, _ in objects]


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    low, high = IMAGE_SIDE_RANGE
    while True:
        width, height = (int(side) for side in rng.integers(low, high + 1, size=2))
        if max(width, height) <= MAX_ASPECT_RATIO * min(width, height):
            return width, height


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A soft linear gradient between two muted, near-grey colours (chroma <= 24, objects >= 120)."""
    ends = rng.uniform(70, 190, size=(2, 1)) + rng.uniform(-12, 12, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(np.cos(angle) / width)
    ys = np.arange(height, dtype=np.float32)[:, None] * np.float32(np.sin(angle) / height)
    along = xs + ys
    along = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    start, end = ends.astype(np.float32)
    return start + along[..., None] * (end - start)


def _place_objects(
    rng: np.random.Generator, width: int, height: int, allowed: Mapping[str, Sequence[str]]
) -> list[tuple[_Object, np.ndarray]]:
    """Non-overlapping objects, each with its shape mask; a margin separates every pair."""
    shorter = min(width, height)
    gap = max(3, round(0.04 * shorter))
    border = max(2, round(0.02 * shorter))
    while True:
        wanted = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
        placed: list[tuple[_Object, np.ndarray]] = []
        for _ in range(wanted):
            colour = str(rng.choice(allowed["colour"]))
            shape = str(rng.choice(allowed["shape"]))
            size = str(rng.choice(allowed["size"]))
            # A large object that finds no room may become small, or the image ends with fewer objects.
            sizes_to_try = [size] + (["small"] if size == "large" and "small" in allowed["size"] else [])
            for size_class in sizes_to_try:
                side = round(rng.uniform(*SIZE_FRACTIONS[size_class]) * shorter)
                corner = _free_corner(rng, side, width, height, border, gap, [obj.box for obj, _ in placed])
                if corner is not None:
                    mask = _shape_mask(shape, side)
                    rows, cols = np.nonzero(mask)
                    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
                    x, y = corner
                    box = (x + int(left), y + int(top), x + int(right), y + int(bottom))
                    placed.append((_Object(colour, shape, size_class, box), mask[top:bottom, left:right]))
                    break
            else:
                break
        if len(placed) >= OBJECTS_PER_IMAGE[0]:
            return placed


def _free_corner(
    rng: np.random.Generator,
    side: int,
    width: int,
    height: int,
    border: int,
    gap: int,
    taken: Sequence[tuple[int, int, int, int]],
) -> tuple[int, int] | None:
    for _ in range(_PLACEMENT_TRIES):
        x = int(rng.integers(border, width - border - side + 1))
        y = int(rng.integers(border, height - border - side + 1))
        if all(
            x + side + gap <= x1 or x2 + gap <= x or y + side + gap <= y1 or y2 + gap <= y
            for x1, y1, x2, y2 in taken
        ):
            return x, y
    return None


def _shape_mask(shape: str, side: int) -> np.ndarray:
    canvas = Image.new("1", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    last = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=1)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=1)
    elif shape == "triangle":
        draw.polygon([(last / 2, 0), (last, last), (0, last)], fill=1)
    elif shape == "diamond":
        draw.polygon([(last / 2, 0), (last, last / 2), (last / 2, last), (0, last / 2)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    return np.asarray(canvas, dtype=bool)


def _paint(rng: np.random.Generator, pixels: np.ndarray, placed: tuple[_Object, np.ndarray]) -> None:
    obj, mask = placed
    x1, y1, x2, y2 = obj.box
    colour = np.asarray(COLOUR_PROTOTYPES[obj.colour], dtype=np.float32)
    colour += rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3).astype(np.float32)
    pixels[y1:y2, x1:x2][mask] = colour


def _save_image(out_dir: Path, stem: str, displayed: Image.Image, orientation: int | None) -> str:
    if orientation is None:
        relative = f"images/{stem}.png"
        displayed.save(out_dir / relative, "PNG", compress_level=1)
        return relative
    relative = f"images/{stem}.jpg"
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION_TAG] = orientation
    stored = displayed.transpose(_STORE_TRANSPOSE[orientation])
    stored.save(out_dir / relative, "JPEG", quality=92, exif=exif)
    return relative


def _conversation(
    rng: np.random.Generator,
    objects: Sequence[_Object],
    width: int,
    turns: int,
    weights: Mapping[str, float],
    balance: Mapping[str, itertools.cycle],
) -> list[dict[str, str]]:
    """Draw up to `turns` distinct questions about the image's regions.

    A region is either captioned or asked about its attributes (a "larger" answer gives away both
    sizes), never both in one conversation, so that no answer can be copied from an earlier turn
    instead of read from the image.
    """
    indices = range(len(objects))
    pairs = list(itertools.combinations(indices, 2))
    open_questions = {
        "caption": [(i,) for i in indices],
        "colour": [(i,) for i in indices],
        "shape": [(i,) for i in indices],
        "size": [(i,) for i in indices],
        "left": [
            (i, j)
            for i, j in pairs
            if abs(objects[i].centre_x - objects[j].centre_x) > LEFT_MIN_SEPARATION * width
        ],
        "larger": [(i, j) for i, j in pairs if objects[i].size != objects[j].size],
    }
    captioned: set[int] = set()
    queried: set[int] = set()
    conversation = []
    for _ in range(turns):
        open_questions["caption"] = [q for q in open_questions["caption"] if q[0] not in queried]
        for kind in (*ATTRIBUTES, "larger"):
            open_questions[kind] = [q for q in open_questions[kind] if captioned.isdisjoint(q)]
        kinds = [kind for kind in QUESTION_KINDS if open_questions[kind] and weights[kind] > 0]
        if not kinds:
            break
        chances = np.array([weights[kind] for kind in kinds])
        kind = kinds[int(rng.choice(len(kinds), p=chances / chances.sum()))]
        regions = open_questions[kind].pop(int(rng.integers(len(open_questions[kind]))))
        question, answer = _question(kind, regions, objects, balance)
        if kind == "caption":
            captioned.update(regions)
        elif kind != "left":
            queried.update(regions)
        conversation.append({"from": "human", "value": question, "kind": kind})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


def _question(
    kind: str, regions: tuple[int, ...], objects: Sequence[_Object], balance: Mapping[str, itertools.cycle]
) -> tuple[str, str]:
    def tag(i: int) -> str:
        return f"<region{i + 1}>"

    if kind in ("caption", "colour", "shape", "size"):
        (i,) = regions
        obj = objects[i]
        answer = format_caption(obj.size, obj.colour, obj.shape) if kind == "caption" else getattr(obj, kind)
        return QUESTION_TEMPLATES[kind].format(a=tag(i)), answer
    i, j = regions
    if kind == "left":
        left, right = sorted(regions, key=lambda k: objects[k].centre_x)
        a, b = (left, right) if next(balance["left"]) else (right, left)
        return QUESTION_TEMPLATES["left"].format(a=tag(a), b=tag(b)), "yes" if a == left else "no"
    # kind == "larger": the answer names the larger region by its tag, as the question wrote it.
    large, small = (i, j) if objects[i].size == "large" else (j, i)
    a, b = (large, small) if next(balance["larger"]) else (small, large)
    return QUESTION_TEMPLATES["larger"].format(a=tag(a), b=tag(b)), tag(large).strip("<>")


def _count(
    summary: WorldSummary,
    objects: Sequence[_Object],
    conversation: Sequence[Mapping],
    orientation: int | None,
) -> None:
    summary.images += 1
    summary.regions += len(objects)
    summary.jpeg_images += orientation is not None
    for obj in objects:
        for name in ATTRIBUTES:
            summary.attributes[name][getattr(obj, name)] += 1
    for human, gpt in zip(conversation[::2], conversation[1::2], strict=True):
        kind = human["kind"]
        summary.kinds[kind] += 1
        if kind == "left":
            summary.answers["left"][gpt["value"]] += 1
        elif kind == "larger":
            first = re.search(r"<(region\d+)>", human["value"]).group(1)
            summary.answers["larger"]["first" if gpt["value"] == first else "second"] += 1


__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "QUESTION_KINDS",
    "QUESTION_TEMPLATES",
    "SHAPES",
    "SIZES",
    "WorldSummary",
    "format_caption",
    "generate_world",
    "parse_caption",
]
