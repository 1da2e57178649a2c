"""Instance segmentation mask AP through pycocotools' COCOeval (thing categories only)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


def encode(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool -> N COCO RLEs (counts as str, JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _cat(state) -> Tensor | None:
    """A list state as one tensor (it already is one after torchmetrics' synchronisation)."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else None


class InstanceEvaluator(Metric):
    """Mask AP as a torchmetrics ``Metric``: the ground truth and predictions of each image (RLE
    masks) are kept as one JSON record, and all processes' records are gathered
    (``dist_reduce_fx="cat"``) before COCOeval(iouType="segm") runs on them.

    Why JSON bytes: torchmetrics gathers tensors only, and COCO's records are nested dicts with
    strings; one uint8 tensor per image (and its length, to split them again) carries them.

    Args:
        categories: thing categories, ``{"id", "name"}`` (ids as used in ``update``).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, categories: list[dict], **kwargs):
        super().__init__(**kwargs)
        self.categories = [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in categories]
        self.thing_ids = {c["id"] for c in self.categories}
        self.add_state("records", default=[], dist_reduce_fx="cat")
        self.add_state("lengths", default=[], dist_reduce_fx="cat")

    def update(
        self, image_id: int, gt_masks, gt_labels, gt_crowd, pred_masks, pred_labels, pred_scores
    ) -> None:
        """Ground truth ``(N, H, W)`` bool + labels + crowd flags; predictions ``(M, H, W)`` bool + labels + scores.

        Segments of non-thing categories are skipped on both sides.
        """
        gt_masks, pred_masks = np.asarray(gt_masks, dtype=bool), np.asarray(pred_masks, dtype=bool)
        h, w = gt_masks.shape[-2:] if gt_masks.ndim == 3 and len(gt_masks) else pred_masks.shape[-2:]
        record: dict = {"image": {"id": int(image_id), "height": int(h), "width": int(w)}, "gt": [], "dt": []}
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
            record["gt"].append(
                {
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
                record["dt"].append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(lab),
                        "segmentation": rle,
                        "score": float(score),
                    }
                )

        blob = torch.frombuffer(bytearray(json.dumps(record).encode()), dtype=torch.uint8)
        self.records.append(blob.to(self.device))
        self.lengths.append(torch.tensor([len(blob)], device=self.device))

    def _gathered(self) -> tuple[list[dict], list[dict], list[dict]]:
        """(images, ground truth with ids 1.., detections) of every image seen by any process."""
        records, lengths = _cat(self.records), _cat(self.lengths)
        images, gt, dt = [], [], []
        if records is None or lengths is None:
            return images, gt, dt
        for chunk in records.cpu().split(lengths.cpu().tolist()):
            r = json.loads(bytes(chunk.numpy()).decode())
            images.append(r["image"])
            gt += r["gt"]
            dt += r["dt"]
        return images, [dict(g, id=k + 1) for k, g in enumerate(gt)], dt

    def compute(self) -> dict:
        """``{ap, ap50, ap75, aps, apm, apl}`` in %, COCOeval's stats[0:6]; zeros without predictions."""
        keys = ("ap", "ap50", "ap75", "aps", "apm", "apl")
        images, gt, dts = self._gathered()
        if not dts or not gt:
            return dict.fromkeys(keys, 0.0)
        coco = COCO()
        coco.dataset = {"images": images, "annotations": gt, "categories": self.categories}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
            dt = coco.loadRes([dict(d) for d in dts])
            ev = COCOeval(coco, dt, iouType="segm")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {k: 100 * max(float(v), 0.0) for k, v in zip(keys, ev.stats[:6])}
