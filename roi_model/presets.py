"""Named model configurations, for `roi-model info --config` and `roi-model train --config`."""

from __future__ import annotations

from collections.abc import Callable

from transformers import CLIPVisionConfig, LlamaConfig

from .configuration import RegionLLMConfig
from .tiny import tiny_config


def gpt4roi_7b_config(**overrides) -> RegionLLMConfig:
    """GPT4RoI-7B: CLIP ViT-L/14 at 224 px, LLaMA-7B with 6 added tokens, the paper's region encoder."""
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32006,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return RegionLLMConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **overrides)


PRESETS: dict[str, Callable[..., RegionLLMConfig]] = {
    "tiny-convnext": lambda **overrides: tiny_config("convnext", **overrides),
    "tiny-clip": lambda **overrides: tiny_config("clip", **overrides),
    "tiny-siglip": lambda **overrides: tiny_config("siglip", **overrides),
    "gpt4roi-7b": gpt4roi_7b_config,
}


def preset_config(name: str, **overrides) -> RegionLLMConfig:
    """The named config; `overrides` replace its fields (e.g. region_fusion_rounds=0 for an ablation)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)
