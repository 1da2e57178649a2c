"""Point sampling of mask logits (PointRend), as Mask2Former's matcher and criterion use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Inputs (N, C, H, W), coords (N, P, 2) in [0, 1] as (x, y) -> (N, C, P), bilinear, align_corners=False."""
    grid = 2.0 * coords.to(inputs.dtype)[:, :, None, :] - 1.0
    return F.grid_sample(inputs, grid, mode="bilinear", align_corners=False)[..., 0]


def sample_rand(n: int, shape: tuple[int, ...], seeds: list | None, salt: int, device) -> Tensor:
    """(n, *shape) uniform [0, 1): from per-sample seeds when given, else the global RNG.

    Seeding each sample's points by its own seed (and ``salt``: which prediction set / draw) makes
    the loss independent of how a batch is split across processes or ordered within it.
    """
    if seeds is None or any(s is None for s in seeds):
        return torch.rand(n, *shape, device=device)
    out = torch.empty(n, *shape)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed((int(s) * 1_000_033 + salt) % (2**63))
        out[i] = torch.rand(*shape, generator=g)
    return out.to(device)


def uncertain_point_coords(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_ratio: float,
    seeds: list | None = None,
    salt: int = 0,
) -> Tensor:
    """Importance sampling of points near mask boundaries.

    logits (N, 1, H, W) -> coords (N, num_points, 2): ``importance_ratio`` of the points are the most
    uncertain (|logit| smallest) of ``oversample_ratio * num_points`` random candidates; the rest uniform.
    ``seeds``: one per mask (its image's sample seed) to draw reproducibly; ``salt`` tells draws apart.
    """
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = sample_rand(n, (num_sampled, 2), seeds, 2 * salt, logits.device)
    uncertainty = -point_sample(logits, coords).abs()[:, 0]  # (N, num_sampled)
    num_uncertain = int(importance_ratio * num_points)
    # The order of the picked points does not matter to the loss (sums over points): unsorted
    # top-k is 2x faster here.
    idx = uncertainty.topk(num_uncertain, dim=1, sorted=False).indices
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    rest = sample_rand(n, (num_points - num_uncertain, 2), seeds, 2 * salt + 1, logits.device)
    return torch.cat([picked, rest], dim=1)
