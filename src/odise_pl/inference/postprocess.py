"""Mask-classification outputs -> panoptic / semantic segmentation (Mask2Former's inference)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def semantic_inference(probs: Tensor, masks: Tensor) -> Tensor:
    """Class probabilities (Q, K + 1), mask logits (Q, H, W) -> per-pixel class scores (K, H, W).

    Every mask contributes to its classes' scores, so all masks of a class merge (Sec. 4.1).
    """
    return torch.einsum("qk,qhw->khw", probs[:, :-1], masks.sigmoid())


def instance_inference(probs: Tensor, masks: Tensor, isthing: list[bool] | Tensor, topk: int = 100) -> dict:
    """Top-k (query, class) pairs of thing classes (Mask2Former's instance inference).

    probs (Q, K + 1), mask logits (Q, H, W) -> ``masks (M, H, W) bool``, ``labels (M,)``, ``scores (M,)``,
    ``query (M,)`` (the query each instance comes from); score = class probability x mean mask
    probability inside the binary mask.
    """
    k = probs.shape[1] - 1
    scores = probs[:, :k].flatten()
    top = scores.topk(min(topk, scores.numel()), sorted=True)
    labels = top.indices % k
    query = top.indices // k
    thing = torch.as_tensor(isthing, dtype=torch.bool, device=probs.device)[labels]
    labels, query, cls_scores = labels[thing], query[thing], top.values[thing]
    m = masks[query]
    binary = m > 0
    mask_scores = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return {"masks": binary, "labels": labels, "scores": cls_scores * mask_scores, "query": query}


def panoptic_inference(
    probs: Tensor,
    masks: Tensor,
    isthing: list[bool] | Tensor,
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
) -> tuple[Tensor, list[dict]]:
    """One image: class probabilities (Q, K + 1), mask logits (Q, H, W) -> (ids (H, W) int32, segments_info).

    PARITY with Mask2Former / ODISE (object_mask_threshold 0.0, overlap_threshold 0.8): drop
    no-object queries and those below the score threshold; each pixel goes to the query with the
    highest score * mask probability; a query keeps its pixels only where its own mask is >= 0.5
    and when it keeps at least ``overlap_threshold`` of its mask; stuff segments of one class merge.
    segments_info: ``{"id", "category_id" (contiguous), "isthing", "score"}``; id 0 is unassigned.
    """
    num_classes = probs.shape[-1] - 1
    scores, labels = probs.max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    h, w = masks.shape[-2:]
    panoptic = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
    segments: list[dict] = []
    if not keep.any():
        return panoptic, segments
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep].sigmoid()
    n = len(cur_classes)
    # argmax over queries of score * mask probability, as a running maximum (strict >, so ties go
    # to the first query like argmax): no (n, H, W) product tensor.
    best = cur_scores[0] * cur_masks[0]
    mask_ids = torch.zeros((h, w), dtype=torch.long, device=masks.device)
    for k in range(1, n):
        val = cur_scores[k] * cur_masks[k]
        better = val > best
        best = torch.where(better, val, best)
        mask_ids.masked_fill_(better, k)
    # Areas of every query at once (one pass over the pixels, not three per query): a pixel joins
    # query k's segment when k wins it and k's own mask covers it (own_at: the winner's own mask).
    own = cur_masks >= 0.5
    own_at = own.gather(0, mask_ids[None])[0]
    ids = mask_ids.flatten()
    won_area = torch.bincount(ids, minlength=n).tolist()
    kept_area = torch.bincount(ids[own_at.flatten()], minlength=n).tolist()
    # numpy counts booleans ~10x faster than torch's bool reduction on CPU
    own_area = np.count_nonzero(own.reshape(n, -1).cpu().numpy(), axis=1).tolist()
    seg_of_query = torch.zeros(n, dtype=torch.int32, device=masks.device)
    stuff_ids: dict[int, int] = {}
    for k in range(n):
        cls = int(cur_classes[k])
        thing = bool(isthing[cls])
        if won_area[k] == 0 or own_area[k] == 0 or kept_area[k] == 0:
            continue
        if won_area[k] / own_area[k] < overlap_threshold:
            continue
        if not thing and cls in stuff_ids:
            seg_of_query[k] = stuff_ids[cls]
            continue
        seg_id = len(segments) + 1
        if not thing:
            stuff_ids[cls] = seg_id
        seg_of_query[k] = seg_id
        segments.append({"id": seg_id, "category_id": cls, "isthing": thing, "score": float(cur_scores[k])})
    panoptic = torch.where(own_at, seg_of_query[mask_ids], panoptic)
    return panoptic, segments
