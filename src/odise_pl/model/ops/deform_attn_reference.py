"""The reference form of multi-scale deformable attention (Deformable DETR, Eq. 2-3): one
``F.grid_sample`` per level and a weighted sum, as the authors' ``ms_deform_attn_core_pytorch``.
Used on CUDA, where ``grid_sample`` is fused; on CPU it is the reference the gather kernel is tested
against (``tests/test_pixel_decoder.py``, and the official fixtures in ``tests/test_official_parity.py``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_grid_sample(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Value (B, S, M, Dh), S = sum(h_l * w_l); locations (B, Lq, M, L, P, 2) in [0, 1] as (x, y);
    weights (B, Lq, M, L, P) -> (B, Lq, M * Dh). Bilinear sampling, zero padding, align_corners=False.
    """
    b, _, m, dh = value.shape
    _, lq, _, n_levels, n_points, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    attn = weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels, n_points)
    out = None
    # Weighted sum level by level: no (B*M, Dh, Lq, L*P) stack of all samples (a copy as large as
    # the samples themselves, forward and backward), a third of the peak temporary memory.
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(b * m, dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*M, Lq, P, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        part = (sampled * attn[..., lvl, :]).sum(-1)  # (B*M, Dh, Lq)
        out = part if out is None else out + part
    return out.view(b, m * dh, lq).transpose(1, 2)
