"""The region-level LLM: vision tower, image projector, region encoder and a causal LM.

The image placeholder tokens (`<im_patch>`) are replaced by the projected image tokens and each
`<bbox>` by its region token, in order; the language model then runs on the embeddings. As in
transformers' llava, `generate` takes the pixel values and boxes and uses them at the prefill only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import RegionLLMConfig
from .region_encoder import RegionEncoder
from .vision import VisionTower


@dataclass
class ImageFeatures:
    """What the LLM needs from an image, independent of any box: cacheable per image."""

    tokens: torch.Tensor  # (batch, image tokens, LLM width), projected
    pyramid: list[torch.Tensor]  # the fused region pyramid, one (batch, C, H, W) map per level

    def select(self, index: torch.Tensor | list[int]) -> ImageFeatures:
        """The features of the given images (repeats allowed), in that order."""
        return ImageFeatures(self.tokens[index], [level[index] for level in self.pyramid])


def build_projector(kind: str, in_features: int, out_features: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    return nn.Sequential(
        nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features)
    )


class RegionLLMPreTrainedModel(PreTrainedModel):
    config_class = RegionLLMConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Our own modules (projector, region encoder) start from PyTorch's default initialisation, as in
        GPT4RoI; the vision tower and the LM keep their own (transformers dispatches to sub-models).

        Zero biases would be harmful here: LayerNorm(ReLU(W @ box)) does not change when a box is scaled,
        so the box position embedding could not tell a small box from a large one.
        """
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)):
            module.reset_parameters()
        else:
            super()._init_weights(module)


class RegionLLMForCausalLM(RegionLLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: RegionLLMConfig):
        super().__init__(config)
        self.vision_tower = VisionTower(
            config.vision_config, config.vision_feature_layer, config.region_feature_layers
        )
        text_width = config.text_config.hidden_size
        self.mm_projector = build_projector(
            config.projector_type, self.vision_tower.image_channels, text_width
        )
        self.region_encoder = RegionEncoder(config, self.vision_tower.region_channels, text_width)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.num_image_tokens(self.config.image_size)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> ImageFeatures:
        frozen = self.config.freeze_vision_tower
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            vision = self.vision_tower(pixel_values.to(self.dtype))
        tokens = self.mm_projector(vision.image_tokens)
        return ImageFeatures(tokens=tokens, pyramid=self.region_encoder.fuse(vision.level_maps))

    def get_region_features(
        self, pyramid: list[torch.Tensor], boxes: list[torch.Tensor], image_index: list[int] | None = None
    ) -> torch.Tensor:
        """One token per box: `boxes[i]` holds normalized boxes, in `<bbox>` order, on image `image_index[i]`
        of the pyramid batch (default: image i)."""
        boxes = [image_boxes.to(device=pyramid[0].device, dtype=pyramid[0].dtype) for image_boxes in boxes]
        return self.region_encoder.pool(pyramid, boxes, image_index)

    def get_placeholder_mask(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return input_ids == self.config.image_patch_token_id, input_ids == self.config.bbox_token_id

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        region_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the placeholders filled, row by row in order."""
        embeds = self.get_input_embeddings()(input_ids)
        image_mask, bbox_mask = self.get_placeholder_mask(input_ids)
        for name, mask, features in (
            ("image", image_mask, image_tokens),
            ("region", bbox_mask, region_tokens),
        ):
            expected = int(mask.sum())
            given = 0 if features is None else features.numel() // embeds.shape[-1]
            if expected != given:
                raise ValueError(
                    f"{expected} {name} placeholder tokens in the input but {given} {name} features"
                )
            if expected:
                embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        boxes: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
        image_index: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """One image per row: row i shows image `image_index[i]` of `pixel_values` (or of `image_features`;
        default: image i), and `boxes[i]` are row i's boxes. Rows may share an image, which then runs through
        the vision tower once."""
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        rows_image = list(range(len(input_ids))) if image_index is None else image_index.tolist()
        region_tokens = None
        if boxes is not None and any(len(row_boxes) for row_boxes in boxes):
            region_tokens = self.get_region_features(image_features.pyramid, boxes, rows_image)
        if image_features is None and region_tokens is None:
            # a decoding step: generated tokens are embedded as they are, placeholders too (GPT4RoI fills
            # them at the prefill only)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        else:
            image_tokens = image_features.tokens[rows_image] if image_features is not None else None
            inputs_embeds = self.embed_inputs(input_ids, image_tokens, region_tokens)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        """The boxes go with the pixel values: into the prefill, not into the decoding steps after it."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if inputs.get("pixel_values") is None:
            inputs.pop("boxes", None)
        return inputs
