"""Vectorised panoptic merge equals the per-query loop of Mask2Former's panoptic_inference."""

import pytest
import torch

from odise_pl.inference.postprocess import panoptic_inference


def reference(probs, masks, isthing, object_mask_threshold=0.0, overlap_threshold=0.8):
    """Mask2Former's algorithm, written as its loop (three full-image passes per query)."""
    num_classes = probs.shape[-1] - 1
    scores, labels = probs.max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    mprobs = masks.sigmoid()
    panoptic = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    segments = []
    if not keep.any():
        return panoptic, segments
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mprobs[keep]
    mask_ids = (cur_scores[:, None, None] * cur_masks).argmax(0)
    stuff = {}
    for k in range(len(cur_classes)):
        cls = int(cur_classes[k])
        thing = bool(isthing[cls])
        mask_area = int((mask_ids == k).sum())
        original_area = int((cur_masks[k] >= 0.5).sum())
        mask = (mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and int(mask.sum()) > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not thing and cls in stuff:
                panoptic[mask] = stuff[cls]
                continue
            seg = len(segments) + 1
            if not thing:
                stuff[cls] = seg
            panoptic[mask] = seg
            segments.append({"id": seg, "category_id": cls, "isthing": thing, "score": float(cur_scores[k])})
    return panoptic, segments


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("overlap", [0.8, 0.3])
def test_matches_the_loop(seed, overlap):
    g = torch.Generator().manual_seed(seed)
    q, k, h, w = 12, 6, 40, 50
    logits = torch.randn(q, k + 1, generator=g) * 3
    probs = logits.softmax(-1)
    # overlapping rectangles (+5 inside, -5 outside) with noise: some segments survive the overlap
    # rule, some do not, stuff classes repeat
    masks = torch.full((q, h, w), -5.0) + torch.randn(q, h, w, generator=g)
    for i in range(q):
        y = int(torch.randint(0, h - 10, (1,), generator=g))
        x = int(torch.randint(0, w - 10, (1,), generator=g))
        dy, dx = torch.randint(8, 25, (2,), generator=g).tolist()
        masks[i, y : y + dy, x : x + dx] += 10
    isthing = [True, True, True, False, False, False]  # stuff classes merge
    ours = panoptic_inference(probs, masks, isthing, 0.0, overlap)
    ref = reference(probs, masks, isthing, 0.0, overlap)
    assert ours[1] == ref[1]
    assert torch.equal(ours[0], ref[0])
    assert len(ref[1]) > 0
