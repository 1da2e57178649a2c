"""Multi-scale deformable attention (Deformable DETR), the module: offsets and weights from the
query, the sampling core from ``model/ops`` (our CPU gather kernel or the ``grid_sample`` form).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from odise_pl.model.ops import Impl, check_impl, ms_deform_attn_from_offsets


class MSDeformAttn(nn.Module):
    """Deformable attention over L levels: query (B, Lq, C), reference points (B, Lq, L, 2) -> (B, Lq, C).

    ``impl``: the core's implementation (``auto`` | ``gather`` | ``grid_sample``, see ``deform_attn``).
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4, impl: Impl = "auto"
    ):
        super().__init__()
        self.impl = check_impl(impl)  # at construction, not at the first forward
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable DETR's init: offsets start on a ring of directions, one per head, growing per point.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: Tensor, shapes: list[tuple[int, int]]
    ) -> Tensor:
        b, lq, _ = query.shape
        m, n_l, n_p = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value).view(b, value.shape[1], m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, lq, m, n_l, n_p, 2)
        weights = self.attention_weights(query).view(b, lq, m, n_l * n_p).softmax(-1).view(b, lq, m, n_l, n_p)
        out = ms_deform_attn_from_offsets(v, shapes, reference_points, offsets, weights, self.impl)
        return self.output_proj(out)
