"""Semantic segmentation: mIoU from a confusion matrix (Mask2Former's SemSegEvaluator rules).

Pixels labelled ``ignore_label`` (255) are left out; classes that never occur in the ground truth
and are never predicted (union 0) are left out of the mean.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric


class SemanticEvaluator(Metric):
    """A torchmetrics ``Metric`` accumulating a (K, K) confusion matrix, summed over processes;
    ``compute()`` -> ``{miou, fwiou, pacc, macc, iou: [K]}`` (%).

    Args:
        num_classes: K.
        ignore_label: ground-truth value to ignore.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_label: int = 255, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.ignore_label = num_classes, ignore_label
        self.add_state(
            "conf", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred, gt: (H, W) class indices (gt may hold ``ignore_label``)."""
        pred, gt = torch.as_tensor(pred).flatten().long(), torch.as_tensor(gt).flatten().long()
        keep = gt != self.ignore_label
        if (gt[keep] >= self.num_classes).any() or (gt[keep] < 0).any():
            bad = torch.unique(gt[keep][(gt[keep] >= self.num_classes) | (gt[keep] < 0)])[:10].tolist()
            raise ValueError(
                f"ground-truth labels {bad} outside [0, {self.num_classes}) and not the ignore label"
            )
        k = self.num_classes
        gt, pred = gt.to(self.conf.device), pred.to(self.conf.device)
        self.conf += torch.bincount(gt[keep] * k + pred[keep], minlength=k * k).view(k, k)

    def compute(self) -> dict:
        conf = self.conf.double().cpu().numpy()
        tp = np.diag(conf)
        gt_total, pred_total = conf.sum(1), conf.sum(0)
        union = gt_total + pred_total - tp
        valid = union > 0
        iou = np.divide(tp, union, out=np.full_like(tp, np.nan), where=valid)
        acc = np.divide(tp, gt_total, out=np.full_like(tp, np.nan), where=gt_total > 0)
        total = conf.sum()
        freq = gt_total / total if total else gt_total
        return {
            "miou": 100 * float(np.nanmean(iou)) if valid.any() else 0.0,
            "fwiou": 100 * float(np.nansum(freq * iou)),
            "pacc": 100 * float(tp.sum() / total) if total else 0.0,
            "macc": 100 * float(np.nanmean(acc)) if (gt_total > 0).any() else 0.0,
            "iou": [None if np.isnan(v) else 100 * float(v) for v in iou],
        }
