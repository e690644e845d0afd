"""The image a box refers to: the displayed image, decoded the same way for serving and for training.

Label Studio shows an image with its EXIF orientation applied, and boxes are drawn on what it shows
(DESIGN.md, "Data contracts"). Transparent pixels are shown over the page's white background, so they
become white here; an animation shows its first frame. Serving (backend.images, which fetches under the
worker's rules) and training (roi_model.processing) both decode through `decode_displayed`, so a model
sees at serving time exactly the pixels it was trained on.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's format name -> the usual file extension, for the formats a browser shows: Label Studio displayed
# the image the boxes were drawn on, so nothing else is accepted.
BROWSER_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "AVIF": "avif"}
DEFAULT_MAX_PIXELS = 40_000_000


class UndecodableImage(ValueError):
    """The bytes are not an image this project decodes; `problem` says why in a few words."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class TooManyPixels(UndecodableImage):
    def __init__(self, width: int, height: int, limit: int) -> None:
        super().__init__(f"{width}x{height} is {width * height} pixels, more than the limit of {limit}")
        self.width, self.height, self.limit = width, height, limit


def decode_displayed(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`data` as displayed: first frame, EXIF orientation applied, RGB with transparency over white.

    The pixel count is checked from the header before anything is decoded, and Pillow's decompression-bomb
    warning is an error. Raises UndecodableImage naming the problem.
    """
    if not data:
        raise UndecodableImage("the image is empty (0 bytes)")
    # The warning filter is process-wide while it is set; callers (a worker, an export) decode on one thread.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=decodable_formats())  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise TooManyPixels(width, height, max_pixels)
            image.load()  # the first frame; errors of the lazily opened image surface here
            return displayed(image)
        except (UndecodableImage, MemoryError):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise UndecodableImage(f"decompression bomb ({error})") from None
        except UnidentifiedImageError:
            raise UndecodableImage(
                f"not an image in a supported format ({', '.join(BROWSER_FORMATS)})"
            ) from None
        except Exception as error:  # OSError "image file is truncated", SyntaxError, struct.error, ...
            raise UndecodableImage(f"broken image data ({type(error).__name__}: {error})") from None


def displayed(image: Image.Image) -> Image.Image:
    """An opened image as displayed: EXIF orientation applied, RGB with transparency over white."""
    if image.width == 0 or image.height == 0:
        raise UndecodableImage("the image is empty (zero width or height)")
    oriented = ImageOps.exif_transpose(image)
    if oriented.mode == "RGB":
        return oriented
    if oriented.mode in ("RGBA", "LA", "PA") or "transparency" in oriented.info:
        white = Image.new("RGBA", oriented.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, oriented.convert("RGBA")).convert("RGB")
    return oriented.convert("RGB")


def image_format(data: bytes) -> str:
    """Pillow's name for the format of image bytes that decode_displayed accepts (a key of BROWSER_FORMATS)."""
    with Image.open(io.BytesIO(data), formats=decodable_formats()) as image:
        return image.format


def decodable_formats() -> tuple[str, ...]:
    # Pillow registers most plugins lazily: without init() a fresh process would see none, and an empty
    # list must not mean "any format" (EPS, for one, runs Ghostscript).
    Image.init()
    return tuple(name for name in BROWSER_FORMATS if name in Image.OPEN)
