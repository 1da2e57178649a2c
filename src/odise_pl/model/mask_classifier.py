"""Open-vocabulary mask classification by text embeddings over a learnable temperature (Eq. 4-6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskClassifier(nn.Module):
    """``mask_embed: (B, Q, D)``, ``text_embed: (K, S, D)``, ``valid: (K, S)`` -> logits ``(B, Q, K + 1)``.

    logit = scale * cos(z, T(c)), the max over a category's synonyms; the last column is a
    learnable no-object ("null") embedding. ``scale = exp(logit_scale)``, initialised at 1/0.07 and
    clamped to at most 100 (PARITY with the official head; CLIP's own clamp).

    Args:
        embed_dim: D, the CLIP embedding width.
        max_scale: clamp of the scale.

    """

    def __init__(
        self, *, embed_dim: int, init_logit_scale: float = math.log(1 / 0.07), max_scale: float = 100.0
    ):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.null_embed = nn.Parameter(torch.randn(embed_dim) * embed_dim**-0.5)
        self.max_scale = max_scale

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def similarity(self, mask_embed: Tensor, text_embed: Tensor, valid: Tensor) -> Tensor:
        """Cosine similarity, max over synonyms: (B, Q, K)."""
        z = F.normalize(mask_embed, dim=-1)
        sim = torch.einsum("bqd,ksd->bqks", z, text_embed.to(z.dtype))
        return sim.masked_fill(~valid, float("-inf")).amax(-1)

    def forward(self, mask_embed: Tensor, text_embed: Tensor, valid: Tensor) -> Tensor:
        sim = self.similarity(mask_embed, text_embed, valid)
        null = F.normalize(mask_embed, dim=-1) @ F.normalize(self.null_embed, dim=0).to(mask_embed.dtype)
        return self.scale * torch.cat([sim, null[..., None]], dim=-1)
