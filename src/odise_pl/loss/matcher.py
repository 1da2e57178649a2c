"""Hungarian matching of predicted masks to ground-truth segments (Mask2Former)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from odise_pl.loss.point_sampling import point_sample, sample_rand


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean over points of BCE(sigmoid(x), t) for every (query, target) pair.

    inputs (B, Q, P) logits, targets (B, N, P) in {0, 1} -> (B, Q, N).
    """
    p = inputs.shape[-1]
    # BCE(x, 0) = softplus(x) and BCE(x, 1) = softplus(-x) = softplus(x) - x, so
    # sum_p t BCE(x, 1) + (1 - t) BCE(x, 0) = sum_p softplus(x) - x . t: one matrix product
    # instead of Mask2Former's two, and no all-ones / all-zeros target tensors.
    return (F.softplus(inputs).sum(-1, keepdim=True) - inputs @ targets.transpose(1, 2)) / p


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """1 - soft dice for every (query, target) pair: (B, Q, P), (B, N, P) -> (B, Q, N)."""
    s = inputs.sigmoid()
    num = 2 * s @ targets.transpose(1, 2)
    den = s.sum(-1)[:, :, None] + targets.sum(-1)[:, None, :]
    return 1 - (num + 1) / (den + 1)


@torch.no_grad()
def pad_target_masks(targets: list[dict], like: Tensor) -> Tensor:
    """Targets' masks as one float (B, N_max, H, W) tensor (zeros beyond an image's N_b).

    H, W: the largest of any target's masks, empty ones included (an image without targets
    still carries its (0, H, W) masks); ``like`` only gives the device.
    """
    n_max = max(1, max(len(t["masks"]) for t in targets))
    h = max(int(t["masks"].shape[-2]) for t in targets)
    w = max(int(t["masks"].shape[-1]) for t in targets)
    out = like.new_zeros(len(targets), n_max, h, w, dtype=torch.float32)
    for i, t in enumerate(targets):
        m = t["masks"]
        if len(m):
            out[i, : len(m), : m.shape[-2], : m.shape[-1]] = m
    return out


class HungarianMatcher(nn.Module):
    """Minimum-cost one-to-one assignment of queries to targets per image.

    ``outputs``: ``pred_masks (B, Q, h, w)`` logits and optionally ``pred_logits (B, Q, K + 1)``;
    ``targets``: per image ``masks (N_b, H, W)`` and ``labels (N_b,)``
    -> per image ``(query_idx, target_idx)`` int64 tensors of length min(Q, N_b).

    Cost = ``cost_class`` * (-p(class)) + ``cost_mask`` * BCE + ``cost_dice`` * dice over
    ``num_points`` uniformly random points shared by predictions and targets of an image
    (2 / 5 / 5, 12544: Mask2Former). Without ``pred_logits`` (caption supervision) the class term is
    dropped: masks are class-agnostic. All images' costs come from one batched computation,
    targets padded to the largest N; scipy solves each image.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ):
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice, self.num_points = (
            cost_class,
            cost_mask,
            cost_dice,
            num_points,
        )

    @torch.no_grad()
    def cost_matrices(
        self, outputs: dict, targets: list[dict], salt: int = 0, padded: Tensor | None = None
    ) -> Tensor:
        """(B, Q, N_max) costs; columns beyond an image's N_b are padding. ``padded``: the targets'
        masks from :func:`pad_target_masks` (the criterion builds them once for all prediction sets).
        """
        pred = outputs["pred_masks"]
        b, q = pred.shape[:2]
        n_max = max(1, max(len(t["masks"]) for t in targets))
        tgt = pad_target_masks(targets, pred) if padded is None else padded
        seeds = [t.get("seed") for t in targets]
        coords = sample_rand(b, (self.num_points, 2), seeds, 1_000 + salt, pred.device)
        pred_pts = point_sample(pred.float(), coords.float())  # (B, Q, P)
        tgt_pts = point_sample(tgt.float(), coords.float())  # (B, N, P)
        cost = self.cost_mask * batch_sigmoid_ce_cost(pred_pts, tgt_pts) + self.cost_dice * batch_dice_cost(
            pred_pts, tgt_pts
        )
        if "pred_logits" in outputs and self.cost_class:
            prob = outputs["pred_logits"].float().softmax(-1)
            labels = pred.new_zeros(b, n_max, dtype=torch.long)
            for i, t in enumerate(targets):
                labels[i, : len(t["labels"])] = t["labels"]
            cost = cost - self.cost_class * torch.gather(prob, 2, labels[:, None, :].expand(-1, q, -1))
        return cost

    @torch.no_grad()
    def forward(
        self, outputs: dict, targets: list[dict], salt: int = 0, padded: Tensor | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        cost = self.cost_matrices(outputs, targets, salt, padded).cpu().numpy()
        # NaN / inf predictions (a diverging step) must not crash the solver: the loss of such a
        # step is non-finite too and the step is skipped by the LightningModule.
        cost = np.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
        result = []
        for i, t in enumerate(targets):
            n = len(t["masks"])
            if n == 0:
                empty = torch.zeros(0, dtype=torch.long)
                result.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(cost[i, :, :n])
            result.append(
                (torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(np.asarray(cols), dtype=torch.long))
            )
        return result
