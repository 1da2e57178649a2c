import torch

from odise_pl.loss.criterion import SetCriterion, dice_loss, sigmoid_ce_loss
from odise_pl.loss.matcher import HungarianMatcher


def test_losses_equal_float64_reference():
    torch.manual_seed(0)
    x = torch.randn(5, 40)
    t = (torch.rand(5, 40) > 0.5).float()
    x64, t64 = x.double(), t.double()
    s = x64.sigmoid()
    ref_ce = (-(t64 * s.log() + (1 - t64) * (1 - s).log())).mean(1).sum() / 3.0
    ref_dice = (1 - (2 * (s * t64).sum(1) + 1) / (s.sum(1) + t64.sum(1) + 1)).sum() / 3.0
    torch.testing.assert_close(sigmoid_ce_loss(x, t, 3.0).double(), ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dice_loss(x, t, 3.0).double(), ref_dice, rtol=1e-5, atol=1e-6)


def _targets(size=32):
    m = torch.zeros(2, size, size, dtype=torch.bool)
    m[0, : size // 2] = True
    m[1, size // 2 :] = True
    return [{"masks": m, "labels": torch.tensor([0, 2])}]


def test_near_zero_on_perfect_predictions_and_every_aux_key():
    # Perfect masks with moderate logits (+-8) on a fine grid, uniform points: only the
    # sub-pixel band at boundaries, where bilinear targets are fractional, costs anything.
    tg = _targets(256)
    perfect = torch.full((1, 4, 256, 256), -8.0)
    perfect[0, 1][tg[0]["masks"][0]] = 8.0
    perfect[0, 3][tg[0]["masks"][1]] = 8.0
    logits = torch.full((1, 4, 4), -50.0)
    logits[0, 1, 0] = logits[0, 3, 2] = 50.0
    logits[0, 0, 3] = logits[0, 2, 3] = 50.0  # no-object
    out = {
        "pred_masks": perfect,
        "pred_logits": logits,
        "aux_outputs": [{"pred_masks": perfect, "pred_logits": logits} for _ in range(2)],
    }
    crit = SetCriterion(matcher=HungarianMatcher(num_points=4000), num_points=4000, importance_ratio=0.0)
    losses = crit(out, tg)
    assert set(losses) == {f"{k}{s}" for k in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0", "_1")}
    assert all(losses[k].item() < 1e-3 for k in losses if k.startswith("loss_ce")), losses
    assert all(losses[k].item() < 0.05 for k in losses if not k.startswith("loss_ce")), losses
    torch.manual_seed(0)
    rand = {"pred_masks": torch.randn(1, 4, 256, 256), "pred_logits": torch.randn(1, 4, 4)}
    worse = crit(rand, tg)
    assert worse["loss_mask"] > 20 * losses["loss_mask"] and worse["loss_dice"] > 20 * losses["loss_dice"]


def test_caption_mode_has_no_class_loss_and_no_object_weight():
    out = {"pred_masks": torch.randn(1, 4, 8, 8), "aux_outputs": []}
    losses = SetCriterion(matcher=HungarianMatcher(num_points=100), num_points=100)(out, _targets())
    assert set(losses) == {"loss_mask", "loss_dice"}
    # CE with all queries unmatched = weighted mean of -log p(no-object)
    crit = SetCriterion(matcher=HungarianMatcher(num_points=100), num_points=100)
    logits = torch.randn(1, 3, 4)
    ce = crit.loss_labels(
        {"pred_logits": logits},
        [{"labels": torch.tensor([], dtype=torch.long)}],
        [(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))],
    )
    torch.testing.assert_close(ce, -logits.log_softmax(-1)[0, :, -1].mean())
