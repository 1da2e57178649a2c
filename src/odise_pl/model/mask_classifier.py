"""Open-vocabulary mask classification by text embeddings over a learnable temperature (Eq. 4-6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskClassifier(nn.Module):
    """``mask_embed: (B, Q, D)``, raw CLIP ``text_embed: (K, S, T)``, ``valid: (K, S)`` -> logits
    ``(B, Q, K)``, plus a last no-object column ``(B, Q, K + 1)`` when the model has a null embedding.

    PARITY with the official ``CategoryEmbed`` / ``WordEmbed`` + ``cal_pred_logits``: every CLIP text
    embedding (category names, the null embedding, caption nouns) goes through a trained
    ``text_proj = Linear(T, D)`` (T = CLIP's width, 768; D = the mask-embedding width, 256) and
    ``logit = scale * cos(z, text_proj(t))``, the max over a category's synonyms taken on these
    scaled logits. ``scale = exp(logit_scale)`` initialised at 1/0.07 and clamped to at most 100.

    Label models score "no object" with a null embedding: a (1, T) parameter in CLIP's space,
    initialised to CLIP's embedding of the empty string and projected like the names. Caption
    models have none (their binary objectness head gives the no-object probability).

    Args:
        text_dim: T, CLIP's text-embedding width.
        embed_dim: D, the mask embedding's width (official: ``projection_dim = mask_dim``).
        null_init: (T,) or (1, T) initial null embedding (CLIP's embedding of ""), ``None``: no null.
        max_scale: clamp of the scale.

    """

    def __init__(
        self,
        *,
        text_dim: int,
        embed_dim: int,
        null_init: Tensor | None = None,
        init_logit_scale: float = math.log(1 / 0.07),
        max_scale: float = 100.0,
    ):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.null_embed = (
            nn.Parameter(null_init.detach().reshape(1, text_dim).float().clone())
            if null_init is not None
            else None
        )
        self.max_scale = max_scale

    @property
    def has_null(self) -> bool:
        return self.null_embed is not None

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def project(self, text_embed: Tensor) -> Tensor:
        """Raw CLIP text embeddings (..., T) -> L2-normalised projections (..., D)."""
        return F.normalize(self.text_proj(text_embed.to(self.text_proj.weight.dtype)), dim=-1)

    def forward(self, mask_embed: Tensor, text_embed: Tensor, valid: Tensor) -> Tensor:
        z = F.normalize(mask_embed, dim=-1)
        t = self.project(text_embed).to(z.dtype)
        scale = self.scale.to(z.dtype)
        logits = scale * torch.einsum("bqd,ksd->bqks", z, t)
        logits = logits.masked_fill(~valid.to(z.device), float("-inf")).amax(-1)
        if self.null_embed is None:
            return logits
        null = scale * (z @ self.project(self.null_embed).to(z.dtype).t())
        return torch.cat([logits, null], dim=-1)
