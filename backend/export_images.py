"""The images of an export: fetched from Label Studio with limits, measured, and stored under their sha256.

Task image URLs come from task data, which any annotator or import can set, so they are untrusted
(reliability.md §2.4, §3). `fetch_image_bytes` accepts what Label Studio itself serves: paths like
``/data/upload/...``, ``/data/local-files/?d=...`` and absolute URLs on Label Studio's own origin, fetched
with the API key; cloud storage URIs (``s3://``, ``gs://``, ``azure-blob://``) through Label Studio's presign
endpoint; and absolute http(s) URLs whose host is in ``settings.image_allowed_hosts`` (without the key).
Redirects are followed by hand, at most 3, each target checked again; the key goes to Label Studio's origin
only. Bodies are capped at ``settings.image_max_bytes`` while streaming, and the whole download must finish
within ``settings.image_timeout_s``.

`inspect_image` decodes the bytes the way the worker and the trainer will (Pillow, the pixel cap checked
before decoding, decompression-bomb warnings as errors, EXIF orientation applied) to learn the size of the
image *as displayed*, which Label Studio's percent coordinates refer to. `store_image` writes the original
bytes, EXIF included, as ``images/<sha256>.<ext>``.

Every failure raises ImageError naming the URL and the problem.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.atomic_files import write_bytes_atomically
from backend.ls_client import LabelStudioClient
from backend.settings import Settings

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
MAX_REDIRECTS = 3
LABEL_STUDIO_PREFIXES = ("/data/", "/storage-data/")
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
# Formats a browser shows: Label Studio displayed the image the boxes were drawn on.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "AVIF": "avif"}
_ORIENTATION_TAG = 0x0112


class ImageError(ValueError):
    """The image of a task cannot be exported; the message names the URL and the problem."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"image {url}: {problem}")
        self.url = url
        self.problem = problem


@dataclass(frozen=True)
class StoredImage:
    path: str  # "images/<sha256>.<ext>", relative to the dataset folder
    width: int  # pixels of the displayed image (EXIF orientation applied)
    height: int


def fetch_image_bytes(client: LabelStudioClient, url: str, task_id: int, settings: Settings) -> bytes:
    """The bytes at a task's image `url`, within the byte, time and host limits of `settings`."""
    if not isinstance(url, str) or not url.strip():
        raise ImageError(repr(url), "the image URL is empty")
    url = url.strip()
    target = _first_target(client.url, url, task_id)
    # The SDK's own httpx client: its connection pool, without the SDK's default headers (no key leaks).
    http = client.sdk._client_wrapper.httpx_client.httpx_client
    timeout = settings.image_timeout_s
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(target)
        headers = _headers_for(client, parts, url, settings)
        try:
            with http.stream(
                "GET", target, headers=headers, timeout=timeout, follow_redirects=False
            ) as response:
                if response.is_redirect:
                    target = urljoin(target, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise ImageError(url, f"HTTP {response.status_code} from {_without_query(parts)}")
                return _read_capped(response, url, settings, deadline)
        except httpx.HTTPError as error:
            raise ImageError(url, f"cannot fetch from {parts.netloc} ({type(error).__name__})") from None
    raise ImageError(url, f"more than {MAX_REDIRECTS} redirects")


def inspect_image(data: bytes, url: str, settings: Settings) -> tuple[str, int, int]:
    """(file extension, displayed width, displayed height) of image bytes; ImageError when they will not do."""
    formats = tuple(name for name in EXTENSIONS if name in Image.OPEN)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=formats) as image:  # reads the header only
                pixels = image.width * image.height
                if pixels > settings.image_max_pixels:
                    raise ImageError(
                        url,
                        f"{image.width}x{image.height} is more than ROI_IMAGE_MAX_PIXELS={settings.image_max_pixels}",
                    )
                image.load()  # a truncated or broken file fails here, not later in training
                displayed = ImageOps.exif_transpose(image)
                return EXTENSIONS[image.format], displayed.width, displayed.height
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(url, f"decompression bomb ({error})") from None
    except UnidentifiedImageError:
        raise ImageError(url, f"not an image in a browser format ({', '.join(EXTENSIONS)})") from None
    except Exception as error:  # OSError "image file is truncated", SyntaxError, struct.error, ...
        raise ImageError(url, f"broken image data ({type(error).__name__}: {error})") from None


def store_image(out_dir: Path, data: bytes, extension: str) -> str:
    """Write `data` as images/<sha256>.<extension> under `out_dir` (kept if already there); its relative path."""
    relative = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()}.{extension}"
    path = Path(out_dir) / relative
    if not (path.is_file() and path.stat().st_size == len(data)):
        write_bytes_atomically(path, data)
    return relative


def export_image(
    client: LabelStudioClient, url: str, task_id: int, settings: Settings, out_dir: Path
) -> StoredImage:
    """Fetch, measure and store one task image."""
    data = fetch_image_bytes(client, url, task_id, settings)
    extension, width, height = inspect_image(data, url, settings)
    return StoredImage(store_image(out_dir, data, extension), width, height)


def _first_target(label_studio: str, url: str, task_id: int) -> str:
    if url.startswith(LABEL_STUDIO_PREFIXES):
        return label_studio + url
    scheme = urlsplit(url).scheme.lower()
    if scheme in CLOUD_SCHEMES:
        # Label Studio presigns a storage URI for a task it belongs to and redirects to the signed URL.
        fileuri = base64.urlsafe_b64encode(url.encode()).decode()
        return f"{label_studio}/tasks/{int(task_id)}/presign/?fileuri={fileuri}"
    if scheme in ("http", "https"):
        return url
    raise ImageError(url, f"not a Label Studio, cloud storage or http(s) URL (scheme {scheme!r})")


def _headers_for(
    client: LabelStudioClient, parts: SplitResult, url: str, settings: Settings
) -> dict[str, str]:
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ImageError(url, f"cannot fetch {_without_query(parts)}")
    if _same_origin(parts, urlsplit(client.url)):
        # The SDK's Authorization header: "Token <key>", or "Bearer <access token>" refreshed from a PAT.
        return {"Authorization": client.sdk._client_wrapper.get_headers()["Authorization"]}
    allowed = {entry.lower() for entry in settings.image_allowed_hosts}
    if parts.hostname in allowed or f"{parts.hostname}:{parts.port}" in allowed:
        return {}
    raise ImageError(url, f"host {parts.hostname!r} is neither Label Studio nor in ROI_IMAGE_ALLOWED_HOSTS")


def _read_capped(response: httpx.Response, url: str, settings: Settings, deadline: float) -> bytes:
    limit = settings.image_max_bytes
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ImageError(url, f"{declared} bytes is more than ROI_IMAGE_MAX_BYTES={limit}")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            raise ImageError(url, f"the body is larger than ROI_IMAGE_MAX_BYTES={limit}")
        if time.monotonic() > deadline:
            raise ImageError(url, f"the download took longer than {settings.image_timeout_s:g} s")
    return bytes(body)


def _same_origin(a: SplitResult, b: SplitResult) -> bool:
    return (a.scheme.lower(), a.hostname, _port(a)) == (b.scheme.lower(), b.hostname, _port(b))


def _port(parts: SplitResult) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


def _without_query(parts: SplitResult) -> str:
    """A URL fit for messages: signed URLs carry credentials in their query."""
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
