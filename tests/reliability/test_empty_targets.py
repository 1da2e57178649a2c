"""Images without target masks (LSJ crops and the crowd filter make them routinely) in any position
of a batch: the matcher and the criterion handle every mix of empty and non-empty targets."""

import itertools

import pytest
import torch

from odise_pl.loss.criterion import SetCriterion
from odise_pl.loss.matcher import HungarianMatcher


def target(n: int, size: int = 64) -> dict:
    """n masks at full resolution (the predictions are at 1/4), or none (shape (0, H, W), as collated)."""
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        masks[i, i * 8 : i * 8 + 16, 10:40] = True
    return {"masks": masks, "labels": torch.arange(n) % 3}


@pytest.mark.parametrize("counts", list(itertools.product([0, 2], repeat=3)))
def test_any_mix_of_empty_and_non_empty_targets(counts):
    torch.manual_seed(0)
    targets = [target(n) for n in counts]
    pred = torch.randn(3, 5, 16, 16, requires_grad=True)
    logits = torch.randn(3, 5, 4, requires_grad=True)
    aux = [{"pred_masks": pred * 0.5, "pred_logits": logits * 0.5}]
    outputs = {"pred_masks": pred, "pred_logits": logits, "aux_outputs": aux}
    matcher = HungarianMatcher(num_points=64)
    indices = matcher(outputs, targets)
    assert [len(q) for q, _ in indices] == list(counts)
    losses = SetCriterion(matcher=matcher, num_points=64)(outputs, targets)
    assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ("", "_0")}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(pred.grad).all()
    if not any(counts):  # nothing to match: the mask losses are zero, the class loss is all "no object"
        assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0


def test_each_image_is_matched_as_if_alone():
    # an image's matching does not depend on an empty neighbour before it
    torch.manual_seed(0)
    pred = torch.randn(2, 5, 16, 16)
    outputs = {"pred_masks": pred, "pred_logits": torch.randn(2, 5, 4)}
    matcher = HungarianMatcher(num_points=64)
    empty, full = target(0), target(2)
    empty["seed"], full["seed"] = 3, 7  # per-sample seeds, as the training stream gives them
    together = matcher(outputs, [empty, full])[1]
    alone = matcher({k: v[1:] for k, v in outputs.items()}, [full])[0]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
