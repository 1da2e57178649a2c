"""Mask2Former's pixel decoder: multi-scale deformable-attention encoder over s3..s5 + FPN to stride 4.

The deformable-attention core is ours in PyTorch (``model/ops/``) rather than
Mask2Former's CUDA extension: nothing to compile, runs on CPU and GPU, numerics equal to the
reference ``ms_deform_attn_core_pytorch`` of Deformable DETR (tested against a per-point loop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from odise_pl.model.deform_attn import MSDeformAttn
from odise_pl.model.ops import Impl
from odise_pl.model.position_encoding import PositionEmbeddingSine


class DeformEncoderLayer(nn.Module):
    """Post-norm deformable self-attention + FFN over the flattened multi-scale tokens."""

    def __init__(
        self,
        d_model: int,
        n_levels: int,
        n_heads: int,
        n_points: int,
        dim_feedforward: int,
        dropout: float,
        impl: Impl = "auto",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: list[tuple[int, int]]
    ) -> Tensor:
        src = self.norm1(src + self.dropout(self.self_attn(src + pos, reference_points, src, shapes)))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class MSDeformAttnPixelDecoder(nn.Module):
    """``features: {s2: (B, Cin, H/4, W/4), s3, s4, s5}`` -> ``mask_features: (B, mask_dim, H/4, W/4)``,
    ``multi_scale: [(B, conv_dim, H/32, W/32), (.., H/16, ..), (.., H/8, ..)]`` (coarsest first, as the
    transformer decoder consumes them).

    Args:
        in_channels: pyramid width (512).
        conv_dim, mask_dim: 256 / 256 (Mask2Former).
        num_layers, num_heads, num_points, dim_feedforward, dropout: encoder (6, 8, 4, 1024, 0.0).
        deform_attn_impl: ``auto`` (CPU: ``gather``, else ``grid_sample``), ``gather``, ``grid_sample``.
        full_precision: run in fp32 under autocast, inputs cast to fp32 (PARITY: Mask2Former's
            ``forward_features`` is ``@autocast(enabled=False)``, "deformable detr does not support
            half precision"); ``false`` follows the caller's autocast (faster on GPUs).

    """

    def __init__(
        self,
        *,
        in_channels: int = 512,
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        deform_attn_impl: Impl = "auto",  # checked against the config by odise_pl.config
        full_precision: bool = True,
    ):
        super().__init__()
        self.transformer_levels = ("s5", "s4", "s3")
        n = len(self.transformer_levels)
        gn = math.gcd(32, conv_dim)
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_channels, conv_dim, 1), nn.GroupNorm(gn, conv_dim)) for _ in range(n)]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.level_embed = nn.Parameter(torch.empty(n, conv_dim))
        self.pe = PositionEmbeddingSine(conv_dim // 2)
        self.layers = nn.ModuleList(
            [
                DeformEncoderLayer(
                    conv_dim, n, num_heads, num_points, dim_feedforward, dropout, deform_attn_impl
                )
                for _ in range(num_layers)
            ]
        )
        # PARITY (Mask2Former's MSDeformAttnTransformerEncoderOnly._reset_parameters): Xavier-uniform
        # on every weight matrix of the encoder, then each deformable attention's own initialisation,
        # and the level embedding N(0, 1).
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.layers.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)
        self.lateral = nn.Sequential(
            nn.Conv2d(in_channels, conv_dim, 1, bias=False), nn.GroupNorm(gn, conv_dim)
        )
        self.output = nn.Sequential(
            nn.Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False), nn.GroupNorm(gn, conv_dim), nn.ReLU()
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        for conv in (self.lateral[0], self.output[0], self.mask_features):
            nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.constant_(self.mask_features.bias, 0)
        self.conv_dim, self.full_precision = conv_dim, full_precision

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], device, dtype) -> Tensor:
        """(1, S, L, 2) normalised pixel centres of every token, repeated for each level (no padding mask)."""
        refs = []
        for h, w in shapes:
            ys, xs = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, device=device, dtype=dtype) / h,
                torch.linspace(0.5, w - 0.5, w, device=device, dtype=dtype) / w,
                indexing="ij",
            )
            refs.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
        return torch.cat(refs, 0)[None, :, None, :].expand(1, -1, len(shapes), 2)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        device = next(iter(features.values())).device.type
        if self.full_precision and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self._forward({k: v.float() for k, v in features.items()})
        # DIVERGES(pixel-decoder-autocast) with full_precision=false: the caller's autocast dtype
        return self._forward(features)

    def _forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        srcs, pos, shapes = [], [], []
        for lvl, name in enumerate(self.transformer_levels):
            x = self.input_proj[lvl](features[name])
            shapes.append(tuple(x.shape[-2:]))
            pos.append(rearrange(self.pe(x) + self.level_embed[lvl][:, None, None], "b c h w -> b (h w) c"))
            srcs.append(rearrange(x, "b c h w -> b (h w) c"))
        src, pos_all = torch.cat(srcs, 1), torch.cat(pos, 1)
        ref = self.reference_points(shapes, src.device, src.dtype).expand(src.shape[0], -1, -1, -1)
        for layer in self.layers:
            src = layer(src, pos_all, ref, shapes)
        multi_scale = [
            rearrange(t, "b (h w) c -> b c h w", h=h, w=w)
            for t, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)
        ]
        # FPN step to stride 4 from the finest transformer level.
        lat = self.lateral(features["s2"])
        y = self.output(
            lat + F.interpolate(multi_scale[-1], size=lat.shape[-2:], mode="bilinear", align_corners=False)
        )
        return self.mask_features(y), multi_scale
