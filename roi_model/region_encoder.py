"""GPT4RoI's spatial-instruction module: one LLM token per box.

A functional core (coordinate channels, the scale-shuffle channel exchange, RoIAlign on every
level) and thin modules around it, in the manner of torchvision's poolers:

    level maps --upsample--> pyramid --coord channels, 1x1 conv, N x (shuffle, 3x3 conv, GN, ReLU)-->
    fused pyramid --RoIAlign per level, 3x3 conv per level, sum, ReLU, flatten-linear
    (+ box position MLP)--> project to the LLM width.

The fused pyramid depends on the image only, so `fuse` and `pool` are separate calls: the
inference engine caches the first and runs the second for every new box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .configuration import RegionLLMConfig


def add_coordinate_channels(feature_map: torch.Tensor) -> torch.Tensor:
    """Append x and y channels running from -1 to 1 (CoordConv), so convolutions can see position."""
    batch, _, height, width = feature_map.shape
    ys = torch.linspace(-1, 1, height, device=feature_map.device, dtype=feature_map.dtype)
    xs = torch.linspace(-1, 1, width, device=feature_map.device, dtype=feature_map.dtype)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([x, y]).expand(batch, -1, -1, -1)
    return torch.cat([feature_map, coords], dim=1)


def scale_shuffle(levels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Exchange channels between neighbouring levels.

    Each level keeps its first half of channels, takes the last quarter of the next coarser level
    and the third quarter of the next finer one (both resized to its own grid). The first and last
    levels use themselves in place of the missing neighbour.
    """
    channels = levels[0].shape[1]
    quarter = channels // 4
    keep = channels - 2 * quarter
    last = len(levels) - 1
    exchanged = []
    for index, target in enumerate(levels):
        coarser = levels[min(index + 1, last)][:, keep + quarter :]
        finer = levels[max(index - 1, 0)][:, keep : keep + quarter]
        size = target.shape[-2:]
        exchanged.append(
            torch.cat(
                [
                    target[:, :keep],
                    F.interpolate(coarser.float(), size=size, mode="bilinear", align_corners=True).to(
                        target.dtype
                    ),
                    F.interpolate(finer.float(), size=size, mode="bilinear", align_corners=True).to(
                        target.dtype
                    ),
                ],
                dim=1,
            )
        )
    return exchanged


def boxes_to_rois(
    boxes: list[torch.Tensor], image_size: int, image_index: list[int] | None = None
) -> torch.Tensor:
    """Normalized xyxy boxes -> one (K, 5) tensor of [image index, x1, y1, x2, y2] in input pixels.

    `boxes[i]` lies on image `image_index[i]` of the feature batch (default: image i).
    """
    image_index = range(len(boxes)) if image_index is None else image_index
    rois = [
        torch.cat([torch.full_like(image_boxes[:, :1], index), image_boxes * image_size], dim=1)
        for index, image_boxes in zip(image_index, boxes, strict=True)
    ]
    return torch.cat(rois).float()


def multi_level_roi_align(
    pyramid: list[torch.Tensor], rois: torch.Tensor, image_size: int, output_size: int, sampling_ratio: int
) -> list[torch.Tensor]:
    """RoIAlign of the same boxes on every level; each level's scale is its grid over the input size."""
    return [
        roi_align(
            level.float(),
            rois,
            output_size=output_size,
            spatial_scale=level.shape[-1] / image_size,
            sampling_ratio=sampling_ratio,
            aligned=True,
        ).to(level.dtype)
        for level in pyramid
    ]


class FusionRound(nn.Module):
    """One scale-shuffle round: exchange channels, then a 3x3 conv + GroupNorm + ReLU shared by all levels."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [F.relu(self.norm(self.conv(level))) for level in scale_shuffle(levels)]


class ScaleShuffleFusion(nn.Module):
    def __init__(self, in_channels: list[int], embed_dim: int, rounds: int, groups: int):
        super().__init__()
        self.input_convs = nn.ModuleList(nn.Conv2d(channels + 2, embed_dim, 1) for channels in in_channels)
        self.rounds = nn.ModuleList(FusionRound(embed_dim, groups) for _ in range(rounds))

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        levels = [
            conv(add_coordinate_channels(level)) for conv, level in zip(self.input_convs, levels, strict=True)
        ]
        for fusion_round in self.rounds:
            levels = fusion_round(levels)
        return levels


class RegionEncoder(nn.Module):
    def __init__(self, config: RegionLLMConfig, level_channels: list[int], output_dim: int):
        super().__init__()
        self.image_size = config.image_size
        self.pyramid_scales = list(config.region_pyramid_scales)
        self.output_size = config.roi_output_size
        self.sampling_ratio = config.roi_sampling_ratio
        width, hidden = config.region_embed_dim, config.region_hidden_size

        self.fusion = ScaleShuffleFusion(
            level_channels, width, config.region_fusion_rounds, config.region_norm_groups
        )
        self.level_convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in level_channels)
        self.flatten_linear = nn.Linear(width * config.roi_output_size**2, hidden)
        self.position_mlp = (
            nn.Sequential(
                nn.Linear(4, config.region_position_hidden),
                nn.ReLU(),
                nn.LayerNorm(config.region_position_hidden),
                nn.Linear(config.region_position_hidden, hidden),
                nn.ReLU(),
                nn.LayerNorm(hidden),
            )
            if config.use_region_position
            else None
        )
        self.project = nn.Linear(hidden, output_dim)

    def fuse(self, level_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The image-only half: upsample the levels into a pyramid and fuse it."""
        pyramid = []
        for level, scale in zip(level_maps, self.pyramid_scales, strict=True):
            if scale != 1:
                size = (round(level.shape[-2] * scale), round(level.shape[-1] * scale))
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=True)
            pyramid.append(level)
        return self.fusion(pyramid)

    def pool(
        self, pyramid: list[torch.Tensor], boxes: list[torch.Tensor], image_index: list[int] | None = None
    ) -> torch.Tensor:
        """One token per box, for every entry of `boxes` in order: (total boxes, output_dim)."""
        rois = boxes_to_rois(boxes, self.image_size, image_index)
        pooled = multi_level_roi_align(pyramid, rois, self.image_size, self.output_size, self.sampling_ratio)
        features = F.relu(sum(conv(level) for conv, level in zip(self.level_convs, pooled, strict=True)))
        tokens = self.flatten_linear(features.flatten(1))
        if self.position_mlp is not None:
            tokens = tokens + self.position_mlp(torch.cat(boxes).to(tokens.dtype))
        return self.project(tokens)

    def forward(self, level_maps: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        return self.pool(self.fuse(level_maps), boxes)
