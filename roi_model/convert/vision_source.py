"""The vision tower from a local CLIP or SigLIP directory.

The directory may hold the whole contrastive model (CLIPModel, SiglipModel: its text half is
skipped) or the vision model alone, saved by any transformers version: older ones prefix the
keys with `vision_model.`, transformers 5 saves a bare CLIPVisionModel without it. Every tensor
becomes `vision_tower.model.*` of the region-LLM, unchanged but for its dtype.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig

from ..configuration import CLIP_MEAN, CLIP_STD
from .checkpoint_files import CheckpointError, CheckpointReader, PlannedTensor

logger = logging.getLogger(__name__)

TOWER_PREFIX = "vision_tower.model."
SOURCE_PREFIX = "vision_model."
# Parts of a contrastive checkpoint the tower does not use.
TEXT_HALF = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")
# A buffer older transformers saved; the model rebuilds it from the config.
NON_WEIGHTS = ("embeddings.position_ids",)
SUPPORTED = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}
DEFAULT_NORMALIZATION = {
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
    "siglip_vision_model": ([0.5] * 3, [0.5] * 3),
}


@dataclass
class VisionSource:
    directory: Path
    config: PreTrainedConfig  # the vision model's own config (the vision half of a CLIPConfig)
    image_mean: list[float]
    image_std: list[float]
    reader: CheckpointReader

    @classmethod
    def open(cls, directory: str | Path, role: str) -> VisionSource:
        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise CheckpointError(f"{role} {directory} has no config.json")
        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise CheckpointError(f"{role} {directory}: cannot read config.json: {error}") from error
        config = getattr(config, "vision_config", config)
        if config.model_type not in SUPPORTED:
            raise CheckpointError(
                f"{role} {directory} is a {config.model_type!r} model; expected CLIP or SigLIP "
                f"({', '.join(SUPPORTED)})"
            )
        mean, std = _normalization(directory, config.model_type)
        return cls(directory, config, mean, std, CheckpointReader(directory, role))

    @property
    def grid(self) -> int:
        """Patches along each side of the image."""
        return self.config.image_size // self.config.patch_size

    def planned_tensors(self, dtype: torch.dtype) -> list[PlannedTensor]:
        planned = []
        for name in self.reader.names():
            short = name.removeprefix(SOURCE_PREFIX)
            if name.startswith(TEXT_HALF) or short in NON_WEIGHTS:
                continue
            planned.append(
                PlannedTensor(
                    name=TOWER_PREFIX + short,
                    shape=self.reader.shape(name),
                    dtype=dtype,
                    load=partial(self.reader.tensor, name, dtype),
                    origin=f"{self.reader.role} {name}",
                )
            )
        return planned


def _normalization(directory: Path, model_type: str) -> tuple[list[float], list[float]]:
    """The image mean and std of the model's own preprocessor, else its family's."""
    path = directory / "preprocessor_config.json"
    if path.exists():
        settings = json.loads(path.read_text())
        if "image_mean" in settings and "image_std" in settings:
            return [float(v) for v in settings["image_mean"]], [float(v) for v in settings["image_std"]]
    mean, std = DEFAULT_NORMALIZATION[model_type]
    logger.info(
        "%s has no preprocessor_config.json; using the %s normalization", directory, SUPPORTED[model_type]
    )
    return list(mean), list(std)
