"""Point sampling of mask logits (PointRend), as Mask2Former's matcher and criterion use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Inputs (N, C, H, W), coords (N, P, 2) in [0, 1] as (x, y) -> (N, C, P), bilinear, align_corners=False."""
    return F.grid_sample(inputs, 2.0 * coords[:, :, None, :] - 1.0, mode="bilinear", align_corners=False)[
        ..., 0
    ]


def uncertain_point_coords(
    logits: Tensor, num_points: int, oversample_ratio: float, importance_ratio: float
) -> Tensor:
    """Importance sampling of points near mask boundaries.

    logits (N, 1, H, W) -> coords (N, num_points, 2): ``importance_ratio`` of the points are the most
    uncertain (|logit| smallest) of ``oversample_ratio * num_points`` random candidates; the rest uniform.
    """
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device)
    uncertainty = -point_sample(logits, coords).abs()[:, 0]  # (N, num_sampled)
    num_uncertain = int(importance_ratio * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([picked, rest], dim=1)
