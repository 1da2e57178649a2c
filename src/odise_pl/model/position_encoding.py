"""Sine positional encoding of DETR / Mask2Former."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """(B, C, H, W) -> (B, 2 * num_pos_feats, H, W) normalised sine/cosine encoding (no padding mask)."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w)
        x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None, :].expand(h, w)
        eps = 1e-6
        y_embed = y_embed / (h + eps) * self.scale
        x_embed = x_embed / (w + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
        pos = torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)
        return pos[None].expand(b, -1, -1, -1).to(x.dtype)
