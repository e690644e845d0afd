"""Configuration from the environment, read in this one place.

Names follow Label Studio's own ML backends where one exists (LABEL_STUDIO_URL,
LABEL_STUDIO_API_KEY, BASIC_AUTH_USER, ...); our own settings carry the ROI_ prefix.
The worker reads the same settings (worker -> backend is an allowed import).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from roi_contract.describe import DEFAULT_MAX_NEW_TOKENS

LINEAGES = ("project", "global")


class SettingsError(ValueError):
    """An environment variable holds a value its setting cannot take."""


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    # Label Studio
    label_studio_url: str = "http://localhost:8080"
    label_studio_api_key: str = ""
    # Basic auth that Label Studio must send to us; enforced only when both are set.
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    # Redis of the queues; required by the backend and the worker (devstack starts one for development).
    redis_url: str = ""
    # Model registry: $MODEL_DIR/versions/<version>/ plus $MODEL_DIR/current.
    model_dir: Path = Path(".cache/models")
    log_level: str = "WARNING"
    # How long /predict waits for an interactive caption before answering without one.
    predict_timeout_s: float = 20.0
    # Batch /predict answers up to this many tasks inline; larger selections go to the prelabel queue.
    inline_predict_tasks: int = 8
    # A larger selection becomes chunks of this many tasks, each a job on the prelabel queue.
    prelabel_chunk_tasks: int = 16
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    # Largest request body the backend reads: Label Studio sends a whole selection's tasks to /predict
    # (about 1-2 KiB a task with its boxes, so 100,000 tasks fit).
    max_request_bytes: int = 256 * 1024 * 1024
    # Image fetching (backend/images.py: the worker and the export share it)
    image_allowed_hosts: tuple[str, ...] = ()
    local_files_root: Path | None = None
    image_max_bytes: int = 25 * 1024 * 1024
    image_max_pixels: int = 40_000_000
    image_timeout_s: float = 10.0
    # Fine-tuning triggers: every N new curated annotations (0 = off), and a cron schedule ("" = off).
    train_every_annotations: int = 0
    train_schedule: str = ""
    # Devices one fine-tune trains on: more than 1 runs `roi-model train` data-parallel under torchrun.
    train_devices: int = 1
    # What a project's fine-tune makes (worker/registry.py): "project", a LoRA adapter of that project on the
    # shared base, promoted for that project alone; "global", a new base served to every project.
    finetune_lineage: str = "project"
    # Bytes of LoRA adapter weights a worker keeps loaded (least recently used evicted first).
    adapter_cache_bytes: int = 1 << 30
    # Bytes of adapters' ready weights (W + scale * B @ A of each adapted layer) a worker keeps for the most
    # recently served adapters; switching to one of them costs nothing (roi_model/adapters.py).
    adapter_ready_bytes: int = 512 << 20
    # A worker that serves this one project with its adapter merged into the weights (None: every project).
    merge_project: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str, default: str = "") -> str:
            return env.get(name, default)

        def number(name: str, kind: type[int] | type[float], default: float) -> int | float:
            text = get(name, str(default))
            try:
                value = kind(text)
            except ValueError:
                raise SettingsError(
                    f"{name}={text!r} is not {'an integer' if kind is int else 'a number'}"
                ) from None
            if value < 0:
                raise SettingsError(f"{name}={text!r} must not be negative")
            return value

        def positive(name: str, default: int) -> int:
            value = number(name, int, default)
            if value < 1:
                raise SettingsError(f"{name}={get(name)!r} must be at least 1")
            return value

        root = get("ROI_LOCAL_FILES_ROOT")
        lineage = get("ROI_FINETUNE_LINEAGE", cls.finetune_lineage)
        if lineage not in LINEAGES:
            raise SettingsError(f"ROI_FINETUNE_LINEAGE={lineage!r}: use {' or '.join(LINEAGES)}")
        merge = get("ROI_MERGE_PROJECT")
        if merge and not merge.isdigit():
            raise SettingsError(f"ROI_MERGE_PROJECT={merge!r} must be a Label Studio project id")
        return cls(
            label_studio_url=(
                get("LABEL_STUDIO_URL") or get("LABEL_STUDIO_HOST") or cls.label_studio_url
            ).rstrip("/"),
            label_studio_api_key=get("LABEL_STUDIO_API_KEY") or get("LABEL_STUDIO_ACCESS_TOKEN"),
            basic_auth_user=get("BASIC_AUTH_USER"),
            basic_auth_pass=get("BASIC_AUTH_PASS"),
            redis_url=get("REDIS_URL"),
            model_dir=Path(get("MODEL_DIR", str(cls.model_dir))),
            log_level=get("LOG_LEVEL", cls.log_level).upper(),
            predict_timeout_s=number("ROI_PREDICT_TIMEOUT", float, cls.predict_timeout_s),
            inline_predict_tasks=number("ROI_INLINE_PREDICT_TASKS", int, cls.inline_predict_tasks),
            prelabel_chunk_tasks=positive("ROI_PRELABEL_CHUNK_TASKS", cls.prelabel_chunk_tasks),
            max_new_tokens=number("ROI_MAX_NEW_TOKENS", int, cls.max_new_tokens),
            max_request_bytes=number("ROI_MAX_REQUEST_BYTES", int, cls.max_request_bytes),
            image_allowed_hosts=_split(get("ROI_IMAGE_ALLOWED_HOSTS")),
            local_files_root=Path(root) if root else None,
            image_max_bytes=number("ROI_IMAGE_MAX_BYTES", int, cls.image_max_bytes),
            image_max_pixels=number("ROI_IMAGE_MAX_PIXELS", int, cls.image_max_pixels),
            image_timeout_s=number("ROI_IMAGE_TIMEOUT", float, cls.image_timeout_s),
            train_every_annotations=number("ROI_TRAIN_EVERY", int, cls.train_every_annotations),
            train_schedule=get("ROI_TRAIN_SCHEDULE"),
            train_devices=positive("ROI_TRAIN_DEVICES", cls.train_devices),
            finetune_lineage=lineage,
            adapter_cache_bytes=positive("ROI_ADAPTER_CACHE_BYTES", cls.adapter_cache_bytes),
            adapter_ready_bytes=positive("ROI_ADAPTER_READY_BYTES", cls.adapter_ready_bytes),
            merge_project=int(merge) if merge else None,
        )
