"""Hooked backbone features -> a feature pyramid s2..s5 (strides 4, 8, 16, 32)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LEVELS = {4: "s2", 8: "s3", 16: "s4", 32: "s5"}


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class Bottleneck(nn.Module):
    """ResNet bottleneck with GroupNorm (1x1 -> 3x3 -> 1x1): (B, Cin, h, w) -> (B, Cout, h, w).

    PARITY with detectron2's ``BottleneckBlock(norm="GN")`` as the official pyramid builds it: the
    shortcut is a 1x1 conv + GN only when the widths differ and the identity otherwise (the four
    512-wide VAE taps of the official model have no shortcut weights).
    """

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, 1, bias=False)
        self.norm1 = _gn(bottleneck_channels)
        self.conv2 = nn.Conv2d(bottleneck_channels, bottleneck_channels, 3, padding=1, bias=False)
        self.norm2 = _gn(bottleneck_channels)
        self.conv3 = nn.Conv2d(bottleneck_channels, out_channels, 1, bias=False)
        self.norm3 = _gn(out_channels)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), _gn(out_channels))
            if in_channels != out_channels
            else None
        )
        for conv in (self.conv1, self.conv2, self.conv3, *(self.shortcut or [])[:1]):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class FeaturePyramid(nn.Module):
    """PARITY with the official ``FeatureExtractorBackbone.forward_features``: each feature is resized
    (PyTorch's legacy ``nearest``) to ``image_size // s``, s its stride clamped to [4, 32], projected
    by one bottleneck block to ``out_channels``, and features that land on the same stride are
    summed in the backbone's feature order.

    ``features: dict[str, (B, C_i, H/stride_i, W/stride_i)]``, ``image_size: (H, W)``
    -> ``{"s2": (B, out, H/4, W/4), "s3": (B, out, H/8, W/8), "s4": ..., "s5": (B, out, H/32, W/32)}``

    Args:
        feature_info: name -> (channels, stride), from the backbone's ``feature_info()``.
        out_channels: pyramid width (512 in the official code).
        bottleneck_ratio: bottleneck width = out_channels // ratio (4: ResNet's).
        gradient_checkpointing: recompute this part in backward to save activation memory (official: on).

    """

    def __init__(
        self,
        *,
        feature_info: dict[str, tuple[int, int]],
        out_channels: int = 512,
        bottleneck_ratio: int = 4,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.target_stride = {n: min(max(s, 4), 32) for n, (_, s) in feature_info.items()}
        missing = sorted(set(LEVELS) - set(self.target_stride.values()))
        if missing:
            raise ValueError(
                f"no backbone feature reaches stride(s) {missing} (features: {feature_info}); "
                "tap a finer or coarser block, e.g. enable the VAE taps for stride 4"
            )
        self.blocks = nn.ModuleDict(
            {
                n: Bottleneck(c, out_channels, max(out_channels // bottleneck_ratio, 1))
                for n, (c, _) in feature_info.items()
            }
        )

    @property
    def strides(self) -> dict[str, int]:
        return {name: stride for stride, name in LEVELS.items()}

    def _forward(self, features: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        h, w = image_size
        out: dict[str, Tensor] = {}
        for name, block in self.blocks.items():
            stride = self.target_stride[name]
            size = (h // stride, w // stride)
            x = features[name]
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="nearest")
            y = block(x.to(block.conv1.weight.dtype))
            level = LEVELS[stride]
            out[level] = y if level not in out else out[level] + y
        return {level: out[level] for level in ("s2", "s3", "s4", "s5")}

    def forward(self, features: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            names = list(self.blocks)
            outs = checkpoint(
                lambda *xs: tuple(self._forward(dict(zip(names, xs)), image_size).values()),
                *[features[n] for n in names],
                use_reentrant=False,
            )
            return dict(zip(("s2", "s3", "s4", "s5"), outs))
        return self._forward(features, image_size)
