"""The images of an export, stored under their content hash with the size the boxes refer to.

Fetching and decoding are backend.images' (its rules for hosts, credentials, bytes, pixels and formats are
the worker's). What is particular to an export: the original bytes, EXIF included, are kept as
``images/<sha256>.<ext>``, so the same picture is stored once and an unchanged export gives the same files;
and the size recorded is that of the image *as displayed* (EXIF orientation applied), which Label Studio's
percent coordinates refer to. Decoding the bytes as the worker and the trainer will also means that a
truncated or oversized image is refused here, not later in training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import requests

from backend.atomic_files import write_bytes_atomically
from backend.images import decode_image, fetch_image_bytes
from backend.settings import Settings
from roi_contract.images import BROWSER_FORMATS, image_format

IMAGES_DIR = "images"


@dataclass(frozen=True)
class StoredImage:
    path: str  # "images/<sha256>.<ext>", relative to the dataset folder
    width: int  # pixels of the displayed image (EXIF orientation applied)
    height: int


def export_image(
    url: str,
    *,
    task_id: int,
    settings: Settings,
    out_dir: Path,
    session: requests.Session | None = None,
) -> StoredImage:
    """Fetch, measure and store one task image; ImageRejected (backend.images) when it cannot be had."""
    data = fetch_image_bytes(url, task_id=task_id, settings=settings, session=session)
    displayed = decode_image(data, url=url, settings=settings)
    extension = BROWSER_FORMATS[image_format(data)]
    return StoredImage(store_image(out_dir, data, extension), displayed.width, displayed.height)


def store_image(out_dir: Path, data: bytes, extension: str) -> str:
    """Write `data` as images/<sha256>.<extension> under `out_dir` (kept if already there); its relative path."""
    relative = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()}.{extension}"
    path = Path(out_dir) / relative
    if not (path.is_file() and path.stat().st_size == len(data)):
        write_bytes_atomically(path, data)
    return relative
