"""Named model configurations, for `roi-model info --config` and `roi-model train --config`: GPT4RoI-7B's
shape, and region-LLMs of a few MB built from config alone (the tests, the demo model of the synthetic world)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import CLIPVisionConfig, ConvNextConfig, LlamaConfig, SiglipVisionConfig

from .configuration import RegionLLMConfig


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


def tiny_vision_config(kind: str) -> tuple[object, dict]:
    """A vision config and the region-encoder fields that fit it."""
    if kind == "convnext":
        # The tower of reference/synthetic-probe.md: stage maps of 28, 14, 7 and 3 at 112 px.
        vision = ConvNextConfig(
            num_channels=3, patch_size=4, hidden_sizes=[32, 64, 128, 128], depths=[1, 1, 2, 1], image_size=112
        )
        fields = dict(
            image_size=112,
            vision_feature_layer=4,  # the 3x3 stage: 9 global tokens (49 learn too, 1.7x slower: README ablation)
            region_feature_layers=[1, 2, 3],
            region_pyramid_scales=[1.0, 1.0, 1.0],
        )
        return vision, fields
    vit = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
    )
    vision = CLIPVisionConfig(**vit) if kind == "clip" else SiglipVisionConfig(**vit)
    fields = dict(
        image_size=64,
        vision_feature_layer=-2,
        region_feature_layers=[-4, -3, -2, -1],
        region_pyramid_scales=[4.0, 2.0, 1.0, 1.0],
    )
    return vision, fields


def tiny_config(
    kind: str = "convnext", *, text_width: int = 128, text_layers: int = 3, **overrides
) -> RegionLLMConfig:
    """A region-LLM of a few MB. `kind` picks the vision tower: convnext, clip or siglip."""
    if kind not in ("convnext", "clip", "siglip"):
        raise ValueError(f"unknown tiny vision tower {kind!r}: use convnext, clip or siglip")
    vision, vision_fields = tiny_vision_config(kind)
    text = LlamaConfig(
        hidden_size=text_width,
        intermediate_size=text_width * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    fields = dict(
        region_embed_dim=64,
        region_fusion_rounds=2,
        region_norm_groups=8,
        roi_output_size=7,
        region_hidden_size=128,
        region_position_hidden=64,
        template="chat",
        system_prompt="",
        stop_strings=[],
    )
    fields.update(vision_fields)
    fields.update(overrides)
    return RegionLLMConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **fields)


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
