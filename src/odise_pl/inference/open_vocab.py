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
    diff_logits: Tensor,
    clip_logits: Tensor,
    seen: Tensor,
    alpha: float = 0.35,
    beta: float = 0.65,
    objectness_logits: Tensor | None = None,
) -> Tensor:
    """Eq. 10 with per-category weights -> probabilities (..., K + 1) (last = no object).

    diff_logits (..., K + 1) (last = the null embedding's logit), clip_logits (..., K), seen (K,) bool.
    PARITY with the official inference (``PoolingCLIPHead`` + ``ODISE.forward``), which fixes
    what the paper's "proportional to" leaves open:

    * p_diff = softmax over the K categories of the diffusion-side logits (the null excluded),
      p_clip = softmax of the CLIP side;
    * g_k = p_diff_k^(1 - w_k) * p_clip_k^w_k with w_k = ``alpha`` (0.35) for categories seen in
      training and ``beta`` (0.65) for novel ones (the paper's lambda is 1 - w), normalised over k;
    * the no-object probability p_0 comes from the diffusion side alone: softmax over K + 1 of
      ``diff_logits`` (category models) or the binary objectness head (``objectness_logits``
      (..., 2), caption models); the categories share 1 - p_0: ``[g * (1 - p_0), p_0]``.
    """
    p = diff_logits[..., :-1].float().softmax(-1)
    c = clip_logits.float().softmax(-1)
    w = torch.where(
        seen.to(p.device), torch.tensor(alpha, device=p.device), torch.tensor(beta, device=p.device)
    )
    g = p.clamp_min(1e-12) ** (1 - w) * c.clamp_min(1e-12) ** w
    return _with_no_object(g / g.sum(-1, keepdim=True), diff_logits, objectness_logits)


def _with_no_object(cls: Tensor, diff_logits: Tensor, objectness_logits: Tensor | None) -> Tensor:
    """Category probabilities (..., K) summing to 1 -> (..., K + 1) with the no-object probability."""
    source = diff_logits if objectness_logits is None else objectness_logits
    no_object = source.float().softmax(-1)[..., -1:]
    return torch.cat([cls * (1 - no_object), no_object], dim=-1)


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
    objectness_logits: Tensor | None = None,
) -> Tensor:
    """(B, Q, K + 1) probabilities per ``mode``: ``ensemble`` (Eq. 10), ``diffusion`` (Eq. 6 only),
    ``clip`` (CLIP opinion for the categories); the no-object probability always comes from the
    diffusion side: the null embedding, or ``objectness_logits`` (B, Q, 2) of a caption model's
    binary head (see :func:`geometric_ensemble`).
    """
    if mode not in MODES:
        raise ValueError(f"open-vocabulary mode must be one of {MODES}, got {mode!r}")
    if mode == "diffusion":
        # With the null embedding this is the softmax over K + 1: softmax over K times 1 - p_0.
        return _with_no_object(diff_logits[..., :-1].float().softmax(-1), diff_logits, objectness_logits)
    clip_logits = clip_mask_logits(dense, masks, text_embed, valid, clip_scale)
    k = clip_logits.shape[-1]
    if seen is None:
        seen = torch.zeros(k, dtype=torch.bool)
    if mode == "clip":
        alpha = beta = 1.0
    return geometric_ensemble(diff_logits, clip_logits, seen, alpha, beta, objectness_logits)
