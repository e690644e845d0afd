"""One decoder for serving and training: the worker's fetch path and the training path see the same pixels."""

from __future__ import annotations

import io

import pytest
from PIL import Image, UnidentifiedImageError

from backend.images import ImageRejected, decode_image
from backend.settings import Settings
from roi_contract.images import UndecodableImage, decode_displayed, displayed, image_format
from roi_model.processing import load_image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def half_transparent_red() -> Image.Image:
    image = Image.new("RGBA", (8, 8), (200, 30, 30, 255))
    image.paste((200, 30, 30, 0), (0, 0, 4, 8))  # left half: red, but fully transparent
    return image


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 255] + [0, 255, 0] + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 4, 8))
    image.info["transparency"] = 0
    return image


def rotated_jpeg() -> bytes:
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    return encoded(stored, "JPEG", exif=exif, quality=95)


CASES = {
    "transparent RGBA PNG": encoded(half_transparent_red(), "PNG"),
    "palette PNG with a transparent index": encoded(palette_with_transparency(), "PNG"),
    "LA PNG": encoded(Image.new("LA", (6, 6), (90, 0)), "PNG"),
    "EXIF-rotated JPEG": rotated_jpeg(),
    "WebP with alpha": encoded(half_transparent_red(), "WEBP", lossless=True),
}


@pytest.mark.parametrize("data", CASES.values(), ids=CASES.keys())
def test_serving_and_training_decode_the_same_pixels(data, tmp_path):
    path = tmp_path / "image"
    path.write_bytes(data)

    served = decode_image(data, url="test", settings=Settings())
    trained = load_image(path)

    assert served.mode == trained.mode == "RGB"
    assert served.size == trained.size
    assert served.tobytes() == trained.tobytes()


def test_a_transparent_pixel_is_white_on_both_paths(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(CASES["transparent RGBA PNG"])

    assert decode_image(path.read_bytes(), url="test", settings=Settings()).getpixel((1, 1)) == (
        255,
        255,
        255,
    )
    assert load_image(path).getpixel((1, 1)) == (255, 255, 255)
    assert load_image(path).getpixel((6, 1)) == (200, 30, 30)


def test_an_opened_image_is_treated_like_its_bytes():
    image = Image.open(io.BytesIO(CASES["EXIF-rotated JPEG"]))

    assert load_image(image).size == (20, 40)


@pytest.mark.parametrize(
    ("data", "problem"),
    [(b"", "empty"), (b"<html>login</html>", "not an image"), (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not an image")],
)
def test_undecodable_bytes_name_the_problem(data, problem):
    with pytest.raises(UndecodableImage, match=problem):
        decode_displayed(data)


def test_the_band_where_pillow_only_warns_is_refused_too(monkeypatch):
    """Pillow warns above MAX_IMAGE_PIXELS and refuses only above twice that: the warning must refuse."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned = encoded(Image.new("RGB", (40, 40), (0, 0, 255)), "PNG")  # 1600 pixels: in the band
    settings = Settings(image_max_pixels=10**12)  # leave the bomb to Pillow's check

    with pytest.raises(UndecodableImage, match="decompression bomb"):
        decode_displayed(warned, max_pixels=10**12)
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_image(warned, url="band.png", settings=settings)
    assert decode_image(encoded(Image.new("RGB", (25, 40)), "PNG"), url="ok.png", settings=settings).size == (
        25,
        40,
    )  # 1000 pixels: at Pillow's limit, not above it


def test_our_pixel_limit_allows_exactly_the_limit():
    image = encoded(Image.new("RGB", (30, 20)), "PNG")

    assert decode_displayed(image, max_pixels=600).size == (30, 20)
    with pytest.raises(UndecodableImage, match="30x20 is 600 pixels, more than the limit of 599"):
        decode_displayed(image, max_pixels=599)


def test_image_format_names_only_the_formats_a_browser_shows():
    assert image_format(encoded(Image.new("RGB", (4, 4)), "WEBP")) == "WEBP"
    with pytest.raises(UnidentifiedImageError):
        image_format(encoded(Image.new("RGB", (4, 4)), "TIFF"))


WHITE, GREEN = (255, 255, 255), (0, 255, 0)


@pytest.mark.parametrize(
    ("data", "left", "right"),
    [
        (CASES["transparent RGBA PNG"], WHITE, (200, 30, 30)),
        (CASES["palette PNG with a transparent index"], WHITE, GREEN),
        (CASES["LA PNG"], WHITE, WHITE),
        (CASES["WebP with alpha"], WHITE, (200, 30, 30)),
    ],
    ids=["RGBA", "palette", "LA", "WebP"],
)
def test_transparent_pixels_are_shown_over_white(data, left, right):
    shown = decode_displayed(data)

    assert shown.mode == "RGB"
    assert (shown.getpixel((1, 1)), shown.getpixel((shown.width - 1, 1))) == (left, right)


def test_a_palette_image_with_alpha_is_composited_too():
    image = Image.new("PA", (2, 1), (1, 0))  # palette index 1 (green), fully transparent
    image.putpalette([0, 0, 255, 0, 255, 0] + [0, 0, 0] * 254)
    image.putpixel((1, 0), (1, 255))

    shown = displayed(image)

    assert (shown.getpixel((0, 0)), shown.getpixel((1, 0))) == (WHITE, GREEN)


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_an_image_without_pixels_is_refused(size):
    with pytest.raises(UndecodableImage) as refusal:
        displayed(Image.new("RGB", size))
    assert refusal.value.problem == "the image is empty (zero width or height)"


def test_a_one_pixel_wide_or_high_image_is_shown():
    assert displayed(Image.new("RGB", (1, 5), GREEN)).size == (1, 5)
    assert displayed(Image.new("L", (5, 1), 7)).getpixel((4, 0)) == (7, 7, 7)


def test_refusals_of_undecodable_bytes_word_for_word():
    def problem(data: bytes) -> str:
        with pytest.raises(UndecodableImage) as refusal:
            decode_displayed(data)
        return refusal.value.problem

    assert problem(b"") == "the image is empty (0 bytes)"
    assert (
        problem(b"<html>login</html>")
        == "not an image in a supported format (JPEG, PNG, WEBP, GIF, BMP, AVIF)"
    )
    png = encoded(Image.frombytes("RGB", (32, 32), bytes(range(256)) * 12), "PNG")
    assert problem(png[: len(png) // 2]).startswith("broken image data (OSError: ")
