"""Open-vocabulary classification at test time: the diffusion side's category probabilities (Eq. 6)
fused with CLIP's own opinion on each mask (Eq. 9) by a geometric mean (Eq. 10), then the no-object
probability, in the form Mask2Former's post-processing reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from odise_pl.model.transformer_decoder import mask_pool

MODES = ("ensemble", "diffusion", "clip")


def seen_categories(vocabulary: list[list[str]], train_vocabulary: list[list[str]] | None) -> Tensor:
    """(K,) bool: a test category is seen in training when any of its names is a training name.

    PARITY with the official ``PoolingCLIPHead``: exact string comparison against every synonym of
    the training vocabulary (the COCO panoptic synonym lists for the released models).
    """
    if not train_vocabulary:
        return torch.zeros(len(vocabulary), dtype=torch.bool)
    train = {n for syns in train_vocabulary for n in syns}
    return torch.tensor([not train.isdisjoint(syns) for syns in vocabulary], dtype=torch.bool)


def ensemble_logits(
    diff_logits: Tensor, clip_logits: Tensor, seen: Tensor, alpha: float, beta: float
) -> Tensor:
    """Eq. 10 as the official ``PoolingCLIPHead`` resolves it: (..., K) logits of each side ->
    ``log(p_diff^(1 - w) * p_clip^w)`` (not normalised), p = softmax over the K categories,
    w = ``alpha`` for categories seen in training and ``beta`` for novel ones (the paper's lambda is 1 - w).

    # DIVERGES(ensemble-logspace): computed as (1 - w) log_softmax + w log_softmax, the same value in exact arithmetic,
    # but finite where a probability underflows to 0 (the official log of the product gives -inf,
    # and then NaN after its multiplication by the seen / novel mask).
    """
    w = torch.where(
        seen.to(diff_logits.device),
        torch.tensor(alpha, dtype=diff_logits.dtype, device=diff_logits.device),
        torch.tensor(beta, dtype=diff_logits.dtype, device=diff_logits.device),
    )
    return (1 - w) * diff_logits.log_softmax(-1) + w * clip_logits.to(diff_logits.dtype).log_softmax(-1)


def mask_class_scores(category_logits: Tensor, no_object_prob: Tensor) -> Tensor:
    """(..., K) category logits, (...,) no-object probability -> (..., K + 1) class scores.

    PARITY with the official ``ODISE.forward``: ``log([softmax(category_logits) * (1 - p0), p0] + 1e-8)``,
    which Mask2Former's inference then softmaxes (:func:`class_probabilities` returns that softmax).
    """
    p0 = no_object_prob[..., None].to(category_logits.dtype)
    probs = torch.cat([category_logits.softmax(-1) * (1 - p0), p0], dim=-1)
    return torch.log(probs + 1e-8)


def no_object_probability(diff_logits: Tensor, objectness_logits: Tensor | None) -> Tensor:
    """(...,) probability of "no object": the last column of the softmax over the diffusion side's
    K + 1 logits (label models' null embedding), or of the binary head (caption models).
    """
    source = diff_logits if objectness_logits is None else objectness_logits.to(diff_logits.dtype)
    return source.softmax(-1)[..., -1]


def pooled_clip_logits(
    dense: Tensor, masks: Tensor, text_embed: Tensor, valid: Tensor, scale: Tensor | float
) -> Tensor:
    """The pooling alternative to MaskCLIP (``clip_side=pooling``): dense CLIP features (B, D, g, g),
    mask logits (B, Q, h, w), raw text (K, S, D) -> logits (B, Q, K).

    Masks are binarised (sigmoid > 0.5) at the dense grid's resolution and the features inside
    averaged; cosine to each category, max over synonyms, times CLIP's scale.
    """
    from odise_pl.model.clip import clip_logits

    m = F.interpolate(masks.float(), size=dense.shape[-2:], mode="bilinear", align_corners=False)
    pooled = mask_pool(dense.float(), (m.sigmoid() > 0.5).float())
    return clip_logits(pooled, text_embed.float(), valid, scale)


def class_probabilities(
    diff_logits: Tensor,
    clip_logits: Tensor | None = None,
    seen: Tensor | None = None,
    *,
    mode: str = "ensemble",
    alpha: float = 0.3,
    beta: float = 0.7,
    objectness_logits: Tensor | None = None,
) -> Tensor:
    """(B, Q, K + 1) class probabilities as the post-processing uses them (last: no object).

    ``diff_logits``: the diffusion side, (B, Q, K + 1) with the null embedding's column (label
    models) or (B, Q, K) with ``objectness_logits`` (B, Q, 2) (caption models). ``clip_logits`` (B,
    Q, K): CLIP's opinion. ``mode``: ``ensemble`` (Eq. 10), ``diffusion`` (the diffusion side only),
    ``clip`` (CLIP's only); the no-object probability always comes from the diffusion side.
    """
    if mode not in MODES:
        raise ValueError(f"open-vocabulary mode must be one of {MODES}, got {mode!r}")
    k = diff_logits.shape[-1] - (1 if objectness_logits is None else 0)
    p0 = no_object_probability(diff_logits, objectness_logits)
    categories = diff_logits[..., :k]
    if mode != "diffusion":
        if clip_logits is None:
            raise ValueError(f"open-vocabulary mode {mode!r} needs CLIP's logits")
        if seen is None:
            seen = torch.zeros(k, dtype=torch.bool)
        if mode == "clip":
            alpha = beta = 1.0
        categories = ensemble_logits(categories, clip_logits, seen, alpha, beta)
    return mask_class_scores(categories, p0).softmax(-1)
