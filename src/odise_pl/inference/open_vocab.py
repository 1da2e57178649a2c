"""Open-vocabulary classification at test time: the diffusion-side probabilities of Eq. 6 fused
with a CLIP second opinion from mask-pooled dense CLIP features (Eq. 9) by a geometric mean (Eq. 10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from odise_pl.model.transformer_decoder import mask_pool

MODES = ("ensemble", "diffusion", "clip")


def geometric_ensemble(
    diff_logits: Tensor, clip_logits: Tensor, seen: Tensor, alpha: float = 0.35, beta: float = 0.65
) -> Tensor:
    """Eq. 10 with per-category weights (PARITY with the official inference).

    diff_logits (..., K + 1) (last = no-object), clip_logits (..., K), seen (K,) bool
    -> probabilities (..., K + 1): ``p_k = p_diff_k^(1 - w_k) * p_clip_k^w_k`` with ``w_k = alpha``
    (0.35) for categories seen in training and ``beta`` (0.65) for novel ones -- the paper's
    lambda is 1 - w; the no-object probability stays the diffusion side's; renormalised (Eq. 10's
    "proportional to").
    """
    p = diff_logits.float().softmax(-1)
    c = clip_logits.float().softmax(-1)
    w = torch.where(
        seen.to(p.device), torch.tensor(alpha, device=p.device), torch.tensor(beta, device=p.device)
    )
    cls = p[..., :-1].clamp_min(1e-12) ** (1 - w) * c.clamp_min(1e-12) ** w
    out = torch.cat([cls, p[..., -1:]], dim=-1)
    return out / out.sum(-1, keepdim=True)


def clip_mask_logits(
    dense: Tensor, masks: Tensor, text_embed: Tensor, valid: Tensor, scale: Tensor | float
) -> Tensor:
    """CLIP opinion: dense (B, D, g, g), mask logits (B, Q, h, w), text (K, S, D) -> logits (B, Q, K).

    Masks are binarised (sigmoid > 0.5) at the dense grid's resolution and the features inside
    averaged (mask pooling); cosine to each category, max over synonyms, times CLIP's scale.
    """
    m = F.interpolate(masks.float(), size=dense.shape[-2:], mode="bilinear", align_corners=False)
    pooled = F.normalize(mask_pool(dense.float(), (m.sigmoid() > 0.5).float()), dim=-1)
    sim = (
        torch.einsum("bqd,ksd->bqks", pooled, text_embed.float()).masked_fill(~valid, float("-inf")).amax(-1)
    )
    return scale * sim


def class_probabilities(
    diff_logits: Tensor,
    masks: Tensor | None = None,
    dense: Tensor | None = None,
    text_embed: Tensor | None = None,
    valid: Tensor | None = None,
    seen: Tensor | None = None,
    clip_scale: Tensor | float = 100.0,
    mode: str = "ensemble",
    alpha: float = 0.35,
    beta: float = 0.65,
) -> Tensor:
    """(B, Q, K + 1) probabilities per ``mode``: ``ensemble`` (Eq. 10), ``diffusion`` (Eq. 6 only),
    ``clip`` (CLIP opinion for the classes, diffusion no-object).
    """
    if mode not in MODES:
        raise ValueError(f"open-vocabulary mode must be one of {MODES}, got {mode!r}")
    if mode == "diffusion":
        return diff_logits.float().softmax(-1)
    clip_logits = clip_mask_logits(dense, masks, text_embed, valid, clip_scale)
    k = clip_logits.shape[-1]
    if seen is None:
        seen = torch.zeros(k, dtype=torch.bool)
    if mode == "clip":
        return geometric_ensemble(diff_logits, clip_logits, seen, alpha=1.0, beta=1.0)
    return geometric_ensemble(diff_logits, clip_logits, seen, alpha, beta)
