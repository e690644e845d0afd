"""`roi-model export --project N --out DIR`: a project's curated annotations as a dataset folder.

Registered with roi-model through the "roi_model.commands" entry point (pyproject.toml); the fine-tuning
job calls backend.dataset.export_project itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from backend.dataset import export_project
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.settings import Settings
from roi_contract.project import ProjectSettings


def register_cli(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `export` to roi-model (entry point group "roi_model.commands")."""
    command = add_command(
        "export",
        help="turn a Label Studio project's curated annotations into training records (LABEL_STUDIO_URL, ..._API_KEY)",
    )
    command.add_argument("--project", type=int, required=True, help="Label Studio project id")
    command.add_argument(
        "--out",
        type=Path,
        required=True,
        help="dataset folder: data.jsonl, images/, report.json, manifest.json",
    )
    command.add_argument(
        "--extra-params",
        help="the project's ML-backend extra params as JSON, for its prompts and controls "
        '(e.g. \'{"prompts": {"caption": "Describe <region1>."}}\'); default: none',
    )
    command.add_argument(
        "--export-file",
        type=Path,
        help="a JSON export of the project saved from Label Studio (Export > JSON; not JSON-MIN) to convert "
        "instead of fetching one; its images are still fetched",
    )
    command.set_defaults(func=run_export_command)


def run_export_command(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if not settings.label_studio_api_key:
        print("roi-model export: set LABEL_STUDIO_API_KEY (and LABEL_STUDIO_URL)", file=sys.stderr)
        return 2
    try:
        project_settings = ProjectSettings.from_extra_params(args.extra_params)
        exported = None
        if args.export_file is not None:
            exported = json.loads(args.export_file.read_text(encoding="utf-8"))
        client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
        report = export_project(client, args.project, args.out, settings, project_settings, exported)
    except LabelStudioError as error:
        print(f"roi-model export: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # an unreadable or wrong export file (JSON-MIN: named)
        print(f"roi-model export: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, sort_keys=True, ensure_ascii=False))
    return 0
