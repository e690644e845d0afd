"""Configuration of the region-level LLM.

One config describes GPT4RoI-7B and the few-MB test model alike: the vision tower and the
language model are ordinary Hugging Face sub-configs, and every width, level, fusion round
and RoIAlign size of the region encoder is a field here rather than a constant in code.
"""

from __future__ import annotations

from dataclasses import field
from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

GPT4ROI_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_PROMPT = "The <image> provides an overview of the picture.\n"

IMAGE_PATCH_TOKEN = "<im_patch>"
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"
BBOX_TOKEN = "<bbox>"
SPECIAL_TOKENS = (IMAGE_PATCH_TOKEN, BBOX_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN)
CHOICES = {
    "tokenization": ("whole_text", "split_at_added_tokens"),
    "image_resize": ("stretch", "shortest_edge_then_stretch"),
    "region_binding": ("by_number", "by_position"),
}


class RegionLLMConfig(PreTrainedConfig):
    """Vision tower + region encoder + causal LM.

    Vision features:
        vision_feature_layer: hidden-state index of the global image tokens (GPT4RoI: -2).
        region_feature_layers: hidden-state indices feeding the region encoder, finest level first
            (GPT4RoI: -11, -8, -5, -2). For a convolutional tower these index its stage maps.
        region_pyramid_scales: how much each level is upsampled before fusion (GPT4RoI turns four
            16x16 ViT maps into 128/64/32/16: 8, 4, 2, 1). Convolutional stages are a pyramid already: 1s.
    Region encoder (GPT4RoI's spatial-instruction module):
        region_embed_dim: width of the fused pyramid; region_fusion_rounds: scale-shuffle rounds;
        region_norm_groups: GroupNorm groups; roi_output_size / roi_sampling_ratio: RoIAlign;
        region_hidden_size: width after flatten-linear and of the box position embedding;
        region_position_hidden: hidden width of the position MLP; use_region_position switches it off
        (ablation).
    Prompting:
        template: "gpt4roi_v0" (the "###" conversation of the released checkpoints) or "chat"
        (the tokenizer's own chat template).
    How a model was trained to see its inputs (converted GPT4RoI checkpoints set GPT4RoI's; models made
    here keep the defaults they were trained with):
        tokenization: "whole_text" (one tokenizer call on the rendered conversation) or
            "split_at_added_tokens" (GPT4RoI's training tokenizer, transformers 4.29's slow LLaMA
            tokenizer: the text is cut at every added token, the whitespace around the image and box
            tokens is dropped, and each piece is encoded on its own).
        image_resize: "stretch" (one bicubic resize to image_size x image_size) or
            "shortest_edge_then_stretch" (GPT4RoI's demo: CLIPImageProcessor's bicubic resize of the
            shortest edge to image_size, no crop, then a bilinear resize to image_size x image_size).
        region_binding: "by_number" (`<regionK>` reads box K wherever it is mentioned) or "by_position"
            (GPT4RoI: the k-th `<bbox>` of the prompt reads the k-th box, whatever its number).
    """

    model_type: ClassVar[str] = "region_llm"
    sub_configs_defaults: ClassVar[dict] = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None

    image_size: int = 224
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    vision_feature_layer: int = -2
    region_feature_layers: list[int] = field(default_factory=lambda: [-11, -8, -5, -2])
    region_pyramid_scales: list[float] = field(default_factory=lambda: [8.0, 4.0, 2.0, 1.0])
    freeze_vision_tower: bool = True

    region_embed_dim: int = 1024
    region_fusion_rounds: int = 5
    region_norm_groups: int = 64
    roi_output_size: int = 14
    roi_sampling_ratio: int = 2
    region_hidden_size: int = 1024
    region_position_hidden: int = 256
    use_region_position: bool = True

    projector_type: str = "linear"
    template: str = "gpt4roi_v0"
    system_prompt: str = GPT4ROI_SYSTEM_PROMPT
    image_prompt: str = IMAGE_PROMPT
    stop_strings: list[str] = field(default_factory=lambda: ["###"])
    tokenization: str = "whole_text"
    image_resize: str = "stretch"
    region_binding: str = "by_number"

    image_patch_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    bbox_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        levels = len(self.region_feature_layers)
        if len(self.region_pyramid_scales) != levels:
            raise ValueError(
                f"region_pyramid_scales has {len(self.region_pyramid_scales)} entries for {levels} region levels"
            )
        if self.region_embed_dim % 4:
            raise ValueError("region_embed_dim must be divisible by 4 (scale shuffle moves quarters of it)")
        if self.region_embed_dim % self.region_norm_groups:
            raise ValueError("region_embed_dim must be divisible by region_norm_groups")
        if self.template not in ("gpt4roi_v0", "chat"):
            raise ValueError(f"unknown template {self.template!r}: use 'gpt4roi_v0' or 'chat'")
        if self.projector_type not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"unknown projector_type {self.projector_type!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}: use {' or '.join(map(repr, allowed))}"
                )


# Known to AutoConfig, so that tools reading config.json (AutoTokenizer among them) recognise a model directory.
AutoConfig.register(RegionLLMConfig.model_type, RegionLLMConfig, exist_ok=True)
