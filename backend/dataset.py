"""A project's curated annotations as a dataset folder: the export fetched, converted and written atomically.

    <out>/data.jsonl       training records (roi_contract.records), ordered by task and annotation id
    <out>/images/          the images they refer to, named by content hash (backend/export_images.py)
    <out>/report.json      where every annotation and rectangle went (backend/export.py)
    <out>/manifest.json    what was exported, when, and the digests of the two files above (written last)

The export and the label config come through the API client; the images through backend.images, under
the worker's rules. The same export gives byte-identical files; only manifest.json's time differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backend.atomic_files import write_bytes_atomically
from backend.export import Conversion, convert_tasks, images_needed, unresolved_parent_predictions
from backend.export_images import IMAGES_DIR, StoredImage, export_image
from backend.images import ImageRejected, image_session
from backend.labeling import scheme_from_config
from backend.ls_client import LabelStudioClient
from backend.settings import Settings
from roi_contract.project import ProjectSettings

log = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
REPORT_FILE = "report.json"
MANIFEST_FILE = "manifest.json"
_STORED_IMAGE_NAME = re.compile(r"[0-9a-f]{64}\.[a-z]+")


def export_project(
    client: LabelStudioClient,
    project: int,
    out_dir: Path,
    settings: Settings,
    project_settings: ProjectSettings | None = None,
    exported_tasks: list[Any] | None = None,
) -> dict[str, Any]:
    """Export `project` into `out_dir` (data.jsonl, images/, report.json, manifest.json); returns the report.

    `project_settings`: the project's settings (its prompts and controls must be the ones the backend asks
    with; default: the defaults). Images are fetched from settings.label_studio_url with
    settings.label_studio_api_key, so `client` must be for that Label Studio. `exported_tasks`: a JSON export
    of the project saved before (default: fetch one now). An image that cannot be had
    leaves its annotations out and is named in the report. Raises LabelStudioError when Label Studio fails,
    ValueError (UnsupportedConfig) for a label config this backend cannot read.
    """
    out_dir = Path(out_dir)
    params = project_settings or ProjectSettings()
    label_config = client.get_project(project).get("label_config") or ""
    scheme = scheme_from_config(label_config, params.controls)
    exported = client.export_json(project) if exported_tasks is None else exported_tasks
    if not isinstance(exported, list):
        raise ValueError("the export must be a list of tasks (Label Studio's JSON export format)")
    tasks = [_with_parent_predictions(client, task) for task in exported]
    log.info("project %d: %d exported tasks (%s)", project, len(tasks), scheme.kind)

    images: dict[str, StoredImage | str] = {}
    with image_session() as session:  # one connection pool for all the images
        for url, task_id in images_needed(tasks, scheme).items():
            try:
                images[url] = export_image(
                    url, task_id=task_id, settings=settings, out_dir=out_dir, session=session
                )
            except ImageRejected as error:
                log.warning("task %d: %s", task_id, error)
                images[url] = str(error)
    conversion = convert_tasks(tasks, scheme, params.prompts, project, images)
    write_dataset(
        out_dir,
        conversion,
        {
            "project": project,
            "kind": scheme.kind,
            "label_config_sha256": _sha256(label_config.encode()),
            "project_settings": params.model_dump(mode="json", exclude_defaults=True),
        },
    )
    return conversion.report


def _with_parent_predictions(client: LabelStudioClient, task: Mapping[str, Any]) -> Mapping[str, Any]:
    """The task with its full predictions when the export lacks one an annotation came from."""
    if unresolved_parent_predictions(task):
        return {**task, "predictions": client.predictions(task["id"])}
    return task


def write_dataset(out_dir: Path, conversion: Conversion, manifest: Mapping[str, Any]) -> None:
    """data.jsonl and report.json, stored images no record uses removed, then manifest.json (written last)."""
    out_dir = Path(out_dir)
    data = b"".join(_json_bytes(record) + b"\n" for record in conversion.records)
    report = json.dumps(conversion.report, sort_keys=True, indent=1, ensure_ascii=False).encode() + b"\n"
    write_bytes_atomically(out_dir / DATA_FILE, data)
    write_bytes_atomically(out_dir / REPORT_FILE, report)
    used = {record["image"] for record in conversion.records}
    images_dir = out_dir / IMAGES_DIR
    if images_dir.is_dir():
        for path in sorted(images_dir.iterdir()):
            # Only files this export names by content hash: anything else in the folder is left alone.
            if _STORED_IMAGE_NAME.fullmatch(path.name) and f"{IMAGES_DIR}/{path.name}" not in used:
                path.unlink()
    summary = {
        **manifest,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "records": len(conversion.records),
        "images": len(used),
        "files": {DATA_FILE: _sha256(data), REPORT_FILE: _sha256(report)},
    }
    write_bytes_atomically(
        out_dir / MANIFEST_FILE, json.dumps(summary, sort_keys=True, indent=1).encode() + b"\n"
    )


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
