"""Set criterion: category cross-entropy (Eq. 5) and class-agnostic point-sampled BCE + dice mask
losses, over the final and every auxiliary prediction set (deep supervision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odise_pl.loss.matcher import HungarianMatcher, pad_target_masks
from odise_pl.loss.normalisers import CLASS_NORMALISERS, Normalisers, at_least_fp32, count_normalisers
from odise_pl.loss.point_sampling import point_sample, uncertain_point_coords


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """inputs, targets (M, P) -> mean BCE over points, summed over masks, / num_masks."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Inputs (M, P) logits, targets (M, P) -> sum of (1 - soft dice) / num_masks."""
    s = inputs.sigmoid()
    num = 2 * (s * targets).sum(-1)
    den = s.sum(-1) + targets.sum(-1)
    return (1 - (num + 1) / (den + 1)).sum() / num_masks


def _sample_targets(padded: Tensor, indices, coords: Tensor) -> Tensor:
    """Matched target masks sampled at their points: (M, P), M = all matches in ``indices`` order.

    Why not gather the matched masks first: that copies every full-resolution target mask once per
    prediction set (10 per step). When an image's matches cover all its targets (always, with more
    queries than objects), its padded masks are sampled in place with the points reordered instead.
    """
    out, offset = [], 0
    for i, (_, j) in enumerate(indices):
        m, n = len(j), int(padded.shape[1])
        c = coords[offset : offset + m]
        offset += m
        if m == 0:
            continue
        j = j.to(padded.device)
        if m <= n and bool((torch.sort(j).values == torch.arange(m, device=j.device)).all()):
            cc = torch.empty_like(c)
            cc[j] = c  # target j[k] is sampled at the points of match k
            out.append(point_sample(padded[i, :m, None], cc)[:, 0][j])
        else:
            out.append(point_sample(padded[i, j][:, None], c)[:, 0])
    return torch.cat(out)


_PER_CALL = Normalisers(num_masks=1.0)  # the cross-entropy's own weighted mean


class SetCriterion(nn.Module):
    """Losses for Mask2Former-style outputs, weighted; keys ``loss_ce``, ``loss_mask``, ``loss_dice``
    for the final set and ``..._{i}`` for aux set i.

    ``loss_ce`` is computed only when the outputs carry ``pred_logits`` (label supervision); masks
    are always class-agnostic.

    Args:
        matcher: :class:`HungarianMatcher`.
        class_weight, mask_weight, dice_weight: 2.0 / 5.0 / 5.0.
        no_object_weight: CE weight of the no-object class (0.1).
        num_points, oversample_ratio, importance_ratio: 12544 / 3.0 / 0.75.
        class_normaliser: what the cross-entropy's weighted sum is divided by: ``micro_batch``
            (PARITY: each process's batch its own weighted mean, as ``F.cross_entropy(weight=...)``
            in the official code on 8 GPUs of 8 images; under gradient accumulation each
            micro-batch's, averaged) or ``global`` (the global batch's summed weights: the same
            loss however the batch is split across processes and accumulation steps).

    The mask losses are divided by the global batch's number of target masks (PARITY), counted over
    every process and micro-batch of the step (:mod:`odise_pl.loss.normalisers`).
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_ratio: float = 0.75,
        class_normaliser: str = "micro_batch",
    ):
        super().__init__()
        if class_normaliser not in CLASS_NORMALISERS:
            raise ValueError(
                f"model.criterion.class_normaliser must be one of {CLASS_NORMALISERS}, got {class_normaliser!r}"
            )
        # DIVERGES(class-normaliser-global) with class_normaliser=global: one weighted mean over the global batch (official: per process batch)
        self.class_normaliser = class_normaliser
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.no_object_weight = no_object_weight
        self.num_points, self.oversample_ratio, self.importance_ratio = (
            num_points,
            oversample_ratio,
            importance_ratio,
        )

    def normalisers(self, target_groups: list[list[dict]], num_queries: int, device) -> Normalisers:
        """The step's :class:`Normalisers` from the targets of this process's micro-batches."""
        return count_normalisers(
            target_groups,
            num_queries=num_queries,
            no_object_weight=self.no_object_weight,
            class_normaliser=self.class_normaliser,
            device=device,
        )

    def loss_labels(
        self, outputs: dict, targets: list[dict], indices, norm: Normalisers = _PER_CALL
    ) -> Tensor:
        logits = at_least_fp32(outputs["pred_logits"])  # (B, Q, K + 1)
        b, q, k1 = logits.shape
        target_classes = torch.full((b, q), k1 - 1, dtype=torch.long, device=logits.device)
        for i, ((src, tgt), t) in enumerate(zip(indices, targets)):
            target_classes[i, src.to(logits.device)] = t["labels"][tgt].to(logits.device)
        weight = torch.ones(k1, device=logits.device, dtype=logits.dtype)
        weight[-1] = self.no_object_weight
        if norm.class_weight is None:
            return F.cross_entropy(logits.transpose(1, 2), target_classes, weight) / norm.micro_batches
        summed = F.cross_entropy(logits.transpose(1, 2), target_classes, weight, reduction="sum")
        return summed / norm.class_weight

    def loss_masks(
        self,
        outputs: dict,
        targets: list[dict],
        indices,
        num_masks: float,
        salt: int = 0,
        padded: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        pred = outputs["pred_masks"]
        src = torch.cat([pred[i, s] for i, (s, _) in enumerate(indices)])  # (M, h, w)
        if src.shape[0] == 0:
            zero = pred.sum() * 0.0
            return zero, zero
        if padded is None:
            padded = pad_target_masks(targets, pred)
        src = at_least_fp32(src[:, None])
        with torch.no_grad():
            # One seed per matched mask: its image's sample seed and its target index.
            seeds = None
            if all(t.get("seed") is not None for t in targets):
                seeds = [int(t["seed"]) * 997 + int(j) for t, (_, js) in zip(targets, indices) for j in js]
            coords = uncertain_point_coords(
                src, self.num_points, self.oversample_ratio, self.importance_ratio, seeds, salt
            )
            labels = _sample_targets(padded, indices, coords).to(src.dtype)
        logits = point_sample(src, coords)[:, 0]
        return sigmoid_ce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    def forward(
        self, outputs: dict, targets: list[dict], norm: Normalisers | None = None
    ) -> dict[str, Tensor]:
        """outputs: model outputs (with aux_outputs); targets: per image ``masks``, ``labels``;
        ``norm``: the step's normalisers (default: counted over this call's batch on every process).
        """
        pred = outputs["pred_masks"]
        if norm is None:
            norm = self.normalisers([targets], pred.shape[1], pred.device)
        num_masks = norm.num_masks
        sets = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        losses: dict[str, Tensor] = {}
        # Built once: every prediction set is matched against the same (full-resolution) targets.
        padded = pad_target_masks(targets, outputs["pred_masks"])
        for k, (suffix, out) in enumerate(sets):
            indices = self.matcher(out, targets, salt=k, padded=padded)
            if "pred_logits" in out:
                losses["loss_ce" + suffix] = self.weights["loss_ce"] * self.loss_labels(
                    out, targets, indices, norm
                )
            lm, ld = self.loss_masks(out, targets, indices, num_masks, salt=k, padded=padded)
            losses["loss_mask" + suffix] = self.weights["loss_mask"] * lm
            losses["loss_dice" + suffix] = self.weights["loss_dice"] * ld
        return losses
