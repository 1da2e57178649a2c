"""Feeding one forward's predictions to all three evaluators (PQ, mIoU, mask AP) at once."""

from __future__ import annotations

import numpy as np
import torch

from odise_pl.evaluation.instance import InstanceEvaluator
from odise_pl.evaluation.panoptic_quality import PanopticEvaluator
from odise_pl.evaluation.semantic import SemanticEvaluator


def make_evaluators(
    vocabulary: list[list[str]], isthing: list[bool], tasks=("panoptic", "semantic", "instance")
) -> dict:
    """Torchmetrics ``Metric``s over contiguous category ids 0..K-1, by task."""
    cats = [{"id": k, "name": v[0], "isthing": int(t)} for k, (v, t) in enumerate(zip(vocabulary, isthing))]
    out = {}
    if "panoptic" in tasks:
        out["panoptic"] = PanopticEvaluator(cats)
    if "semantic" in tasks:
        out["semantic"] = SemanticEvaluator(len(cats))
    if "instance" in tasks and any(isthing):
        out["instance"] = InstanceEvaluator([c for c in cats if c["isthing"]])
    return out


def update_evaluators(evaluators: dict, pred: dict, target: dict, meta: dict) -> None:
    """pred: a :class:`~odise_pl.inference.predictor.Predictor` result; target: ``masks (N, H, W)`` at
    the original size, ``labels``, ``iscrowd``; meta: ``image_id``, ``height``, ``width``.
    """
    h, w = meta["height"], meta["width"]
    masks = target["masks"][:, :h, :w].cpu().numpy().astype(bool)
    labels = target["labels"].cpu().numpy()
    crowd = target["iscrowd"].cpu().numpy().astype(bool)
    if "panoptic" in evaluators and "panoptic" in pred:
        gt_ids = np.zeros((h, w), dtype=np.uint32)
        gt_segs = []
        for j, (m, lab, c) in enumerate(zip(masks, labels, crowd)):
            gt_ids[m] = j + 1
            gt_segs.append({"id": j + 1, "category_id": int(lab), "iscrowd": int(c), "area": int(m.sum())})
        ids, segs = pred["panoptic"]
        evaluators["panoptic"].update(
            gt_ids,
            gt_segs,
            ids.cpu().numpy().astype(np.uint32),
            [{"id": s["id"], "category_id": s["category_id"]} for s in segs],
            image=str(meta.get("image_id", "")),
        )
    if "semantic" in evaluators and "semantic" in pred:
        gt = np.full((h, w), 255, dtype=np.int64)
        for m, lab in zip(masks, labels):
            gt[m] = lab
        evaluators["semantic"].update(pred["semantic"].argmax(0).cpu(), torch.from_numpy(gt))
    if "instance" in evaluators and "instances" in pred:
        inst = pred["instances"]
        evaluators["instance"].update(
            meta.get("image_id", 0),
            masks,
            labels,
            crowd,
            inst["masks"].cpu().numpy(),
            inst["labels"].cpu().numpy(),
            inst["scores"].cpu().numpy(),
        )


def compute_evaluators(evaluators: dict) -> dict[str, float]:
    """pq, sq, rq (+ _th, _st), miou, ap, ap50 in %, over every process (each metric synchronises
    its state in ``compute``, as torchmetrics does).
    """
    out: dict[str, float] = {}
    if "panoptic" in evaluators:
        r = evaluators["panoptic"].compute()
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for m in ("pq", "sq", "rq"):
                out[m + suffix] = 100 * r[group][m]
    if "semantic" in evaluators:
        out["miou"] = evaluators["semantic"].compute()["miou"]
    if "instance" in evaluators:
        r = evaluators["instance"].compute()
        out["ap"], out["ap50"] = r["ap"], r["ap50"]
    return out
