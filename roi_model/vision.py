"""The vision tower: any Hugging Face vision model that returns hidden states.

Two families are understood:
- ViTs (CLIP, SigLIP): every hidden state is a token sequence of one width; the region levels
  are square token grids reshaped into maps (a CLS token, when present, is dropped).
- Convolutional towers (ConvNeXt): hidden states are stage maps of growing stride and width,
  which already form the feature pyramid the region encoder wants.
The tower yields the global image tokens and the multi-level maps for regions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig


@dataclass
class VisionFeatures:
    image_tokens: torch.Tensor  # (batch, tokens, channels): the global image tokens, before projection
    level_maps: list[torch.Tensor]  # one (batch, channels, height, width) map per region level


def is_convolutional(vision_config: PreTrainedConfig) -> bool:
    return hasattr(vision_config, "hidden_sizes")


def _tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    batch, length, channels = tokens.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"cannot arrange {length} vision tokens on a square grid")
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)


class VisionTower(nn.Module):
    def __init__(self, vision_config: PreTrainedConfig, image_feature_layer: int, region_layers: list[int]):
        super().__init__()
        self.model = AutoModel.from_config(vision_config)
        self.image_feature_layer = image_feature_layer
        self.region_layers = list(region_layers)
        self.convolutional = is_convolutional(vision_config)

    # Shapes, derived from the config so that a meta-device model (GPT4RoI-7B for `info`) needs no forward.
    def _hidden_channels(self) -> list[int]:
        config = self.model.config
        if self.convolutional:
            return [config.hidden_sizes[0], *config.hidden_sizes]
        return [config.hidden_size] * (config.num_hidden_layers + 1)

    def _hidden_grid(self, image_size: int) -> list[int]:
        config = self.model.config
        if self.convolutional:
            # ConvNeXt: a patchify stem, then every stage after the first halves the map.
            stem = image_size // config.patch_size
            return [stem] + [stem // 2**stage for stage in range(len(config.hidden_sizes))]
        return [image_size // config.patch_size] * (config.num_hidden_layers + 1)

    @property
    def image_channels(self) -> int:
        return self._hidden_channels()[self.image_feature_layer]

    @property
    def region_channels(self) -> list[int]:
        channels = self._hidden_channels()
        return [channels[layer] for layer in self.region_layers]

    def num_image_tokens(self, image_size: int) -> int:
        return self._hidden_grid(image_size)[self.image_feature_layer] ** 2

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        hidden_states = self.model(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        if self.convolutional:
            image_tokens = hidden_states[self.image_feature_layer].flatten(2).transpose(1, 2)
            level_maps = [hidden_states[layer] for layer in self.region_layers]
        else:
            image_tokens = self._drop_class_token(hidden_states[self.image_feature_layer])
            level_maps = [
                _tokens_to_map(self._drop_class_token(hidden_states[layer])) for layer in self.region_layers
            ]
        return VisionFeatures(image_tokens=image_tokens, level_maps=level_maps)

    def _drop_class_token(self, tokens: torch.Tensor) -> torch.Tensor:
        # CLIP prepends a CLS token to its patch grid, SigLIP does not; a square count means patches only.
        length = tokens.shape[1]
        return tokens if math.isqrt(length) ** 2 == length else tokens[:, 1:]
