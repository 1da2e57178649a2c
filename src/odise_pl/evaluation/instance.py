"""Instance segmentation mask AP through pycocotools' COCOeval (thing categories only)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def encode(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool -> N COCO RLEs (counts as str, JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


class InstanceEvaluator:
    """Collects ground truth and predictions per image, then runs COCOeval(iouType="segm").

    Args:
        categories: thing categories, ``{"id", "name"}`` (ids as used in ``update``).
    """

    def __init__(self, categories: list[dict]):
        self.categories = [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in categories]
        self.thing_ids = {c["id"] for c in self.categories}
        self.reset()

    def reset(self) -> None:
        self.images: list[dict] = []
        self.gt: list[dict] = []
        self.dt: list[dict] = []

    def update(
        self, image_id: int, gt_masks, gt_labels, gt_crowd, pred_masks, pred_labels, pred_scores
    ) -> None:
        """Ground truth ``(N, H, W)`` bool + labels + crowd flags; predictions ``(M, H, W)`` bool + labels + scores.

        Segments of non-thing categories are skipped on both sides.
        """
        gt_masks, pred_masks = np.asarray(gt_masks, dtype=bool), np.asarray(pred_masks, dtype=bool)
        h, w = gt_masks.shape[-2:] if gt_masks.ndim == 3 and len(gt_masks) else pred_masks.shape[-2:]
        self.images.append({"id": int(image_id), "height": int(h), "width": int(w)})
        for m, rle, lab, crowd in zip(
            gt_masks, encode(gt_masks), np.asarray(gt_labels), np.asarray(gt_crowd)
        ):
            if int(lab) not in self.thing_ids:
                continue
            ys, xs = np.nonzero(m)
            bbox = [
                float(xs.min()),
                float(ys.min()),
                float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1),
            ]
            self.gt.append(
                {
                    "id": len(self.gt) + 1,
                    "image_id": int(image_id),
                    "category_id": int(lab),
                    "segmentation": rle,
                    "area": float(m.sum()),
                    "bbox": bbox,
                    "iscrowd": int(bool(crowd)),
                }
            )
        for rle, lab, score in zip(encode(pred_masks), np.asarray(pred_labels), np.asarray(pred_scores)):
            if int(lab) in self.thing_ids:
                self.dt.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(lab),
                        "segmentation": rle,
                        "score": float(score),
                    }
                )

    def sync(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.images, self.gt, self.dt))
            self.images = [im for p in parts for im in p[0]]
            self.gt = [dict(g, id=k + 1) for k, g in enumerate(g for p in parts for g in p[1])]
            self.dt = [d for p in parts for d in p[2]]

    def compute(self) -> dict:
        """``{ap, ap50, ap75, aps, apm, apl}`` in %, COCOeval's stats[0:6]; zeros without predictions."""
        keys = ("ap", "ap50", "ap75", "aps", "apm", "apl")
        if not self.dt or not self.gt:
            return dict.fromkeys(keys, 0.0)
        coco = COCO()
        coco.dataset = {"images": self.images, "annotations": self.gt, "categories": self.categories}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
            dt = coco.loadRes([dict(d) for d in self.dt])
            ev = COCOeval(coco, dt, iouType="segm")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {k: 100 * max(float(v), 0.0) for k, v in zip(keys, ev.stats[:6])}
