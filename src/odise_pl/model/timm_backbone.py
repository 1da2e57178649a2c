"""A frozen discriminative backbone (timm) behind the diffusion backbone's interface: the Table 3
ablation (CLIP, DINO, MAE, ConvNeXt, Swin) with the same pyramid, mask generator and training.

``images: (B, 3, H, W) in [0, 1]`` -> ``{name: (B, C_i, H/s_i', W/s_i')}``; ``feature_info()`` gives
``name -> (C_i, s_i)`` where ``s_i`` is the pyramid level the feature feeds (the pyramid resizes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Plain ViTs return every tap at one stride (14 or 16). As in ViTDet's simple feature pyramid, the
# taps (early -> late) feed the levels fine -> coarse; the pyramid resamples each to its level.
PLAIN_VIT_LEVELS = (4, 8, 16, 32)


class TimmBackbone(nn.Module):
    """Frozen timm feature extractor with the DiffusionBackbone interface.

    The conditioning (implicit caption, time offset) is accepted and ignored: discriminative models
    have no text input; pair this backbone with ``captioner=empty`` (nothing to train there).

    Args:
        model: a frozen ``features_only`` timm model (``odise_pl.weights.load_timm``).
        size_divisibility: inputs must be a multiple of this (32: the coarsest pyramid level).
        gradient_checkpointing: accepted so that the paper experiments' memory setting holds for
            every backbone; nothing to recompute here (frozen, unconditioned: no gradient passes).
    """

    def __init__(self, model: nn.Module, size_divisibility: int = 32, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.size_divisibility = size_divisibility
        info = model.feature_info
        self._channels = list(info.channels())
        reductions = list(info.reduction())
        if len(set(reductions)) == 1 and len(reductions) == len(PLAIN_VIT_LEVELS):
            self._levels = list(PLAIN_VIT_LEVELS)
        else:
            self._levels = reductions
        self._patch = int(reductions[0]) if len(set(reductions)) == 1 else 1
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.register_buffer(
            "mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False
        )
        self._nhwc = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")

    @property
    def time_embed_dim(self) -> int:
        return 0  # no time embedding to offset

    def feature_info(self) -> dict[str, tuple[int, int]]:
        return {f"timm_{i}": (c, s) for i, (c, s) in enumerate(zip(self._channels, self._levels))}

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm / dropout stay in eval mode

    @torch.no_grad()
    def forward(
        self, images: Tensor, cond: Tensor | None = None, time_offset: Tensor | None = None
    ) -> dict[str, Tensor]:
        """See module docstring; ``cond`` / ``time_offset`` are ignored."""
        x = (images - self.mean) / self.std
        if self._patch > 1:
            # Patch-14 ViTs: the nearest multiple of the patch size (512 -> 504); the pyramid
            # resizes the features to the image's strides anyway.
            h, w = (max(self._patch, round(d / self._patch) * self._patch) for d in x.shape[-2:])
            if (h, w) != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        feats = self.model(x.to(next(self.model.parameters()).dtype))
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return {name: f.contiguous() for name, f in zip(self.feature_info(), feats)}
