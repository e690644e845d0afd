"""Which region-model family a model directory holds, from config.json's model_type, and loading it.

`detect_family` raises UnsupportedModel with the reason (no config.json, unreadable, a model_type no family
implements); `load_region_model` returns the family's roi_model.region_model.RegionModel.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = {
    "region_llm": "region_llm",  # GPT4RoI architecture (roi_model.modeling)
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "florence2": "florence2",
}
DESCRIPTIONS = {
    "region_llm": "GPT4RoI-architecture region-LLM (regions as RoI tokens)",
    "qwen2_5_vl": "Qwen2.5-VL (regions as absolute pixel coordinates of the resized image)",
    "qwen3_vl": "Qwen3-VL (regions as coordinates on a 0-1000 grid)",
    "florence2": "Florence-2 (regions as <loc_0>..<loc_999> location tokens, <REGION_TO_DESCRIPTION>)",
}


class UnsupportedModel(ValueError):
    """The directory is not a model any family can load; the message says why."""


def detect_family(directory: str | Path) -> str:
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise UnsupportedModel(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise UnsupportedModel(f"{config_file} cannot be read as JSON: {error}") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModel(
            f"{config_file} has model_type {model_type!r}, which no region-model family implements "
            f"(supported: {supported})"
        )
    return FAMILIES[model_type]


def load_region_model(directory: str | Path, *, device: str | None = None, dtype=None, **kwargs):
    """The region model of `directory`, in eval mode, offline."""
    family = detect_family(directory)
    if family == "region_llm":
        from .gpt4roi import GPT4RoIRegionModel

        return GPT4RoIRegionModel.from_pretrained(directory, device=device, dtype=dtype, **kwargs)
    if family == "florence2":
        from .florence import FlorenceRegionModel

        return FlorenceRegionModel.from_pretrained(directory, device=device, dtype=dtype)
    from .qwen_vl import QwenVLRegionModel

    return QwenVLRegionModel.from_pretrained(directory, device=device, dtype=dtype)
