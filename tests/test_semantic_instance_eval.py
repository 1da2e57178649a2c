import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from odise_pl.data.coco_panoptic import COCOPanopticDataset
from odise_pl.evaluation.instance import InstanceEvaluator
from odise_pl.evaluation.semantic import SemanticEvaluator


def test_miou_equals_confusion_matrix_reference():
    rng = np.random.default_rng(0)
    ev = SemanticEvaluator(num_classes=5)
    conf = np.zeros((5, 5))
    for _ in range(4):
        gt = rng.integers(0, 5, (20, 30))
        gt[rng.random(gt.shape) < 0.1] = 255
        gt[gt == 4] = 255  # class 4 never in ground truth ...
        pred = np.where(
            rng.random(gt.shape) < 0.6, np.minimum(gt, 3), rng.integers(0, 4, gt.shape)
        )  # ... nor predicted
        ev.update(torch.from_numpy(pred), torch.from_numpy(gt))
        for p, g in zip(pred.ravel(), gt.ravel()):
            if g != 255:
                conf[g, p] += 1
    ious = [conf[k, k] / (conf[k].sum() + conf[:, k].sum() - conf[k, k]) for k in range(4)]
    r = ev.compute()
    assert r["miou"] == pytest.approx(100 * np.mean(ious))
    assert r["iou"][4] is None
    assert r["pacc"] == pytest.approx(100 * np.trace(conf) / conf.sum())


def test_miou_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        SemanticEvaluator(3).update(torch.zeros(2, 2), torch.full((2, 2), 7))


def test_mask_ap_equals_cocoeval_run_directly(synthetic_root):
    root, _ = synthetic_root
    ds = COCOPanopticDataset(root=str(root), split="train", captions=False)
    things = [{"id": i, "name": n} for i, (n, t) in enumerate(zip(ds.class_names, ds.isthing)) if t]
    ours = InstanceEvaluator(things)
    rng = np.random.default_rng(0)
    images, gts, dts = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        masks = item["masks"].numpy()
        pred = np.stack([np.roll(m, int(rng.integers(-3, 4)), axis=1) for m in masks])
        labels = item["labels"].numpy()
        scores = rng.random(len(masks))
        ours.update(item["image_id"], masks, labels, item["iscrowd"].numpy(), pred, labels, scores)
        # the direct route: pycocotools' own encoder and COCO objects
        h, w = masks.shape[-2:]
        images.append({"id": item["image_id"], "height": h, "width": w})
        for m, lab, crowd in zip(masks, labels, item["iscrowd"].numpy()):
            if ds.isthing[lab]:
                rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                gts.append(
                    {
                        "id": len(gts) + 1,
                        "image_id": item["image_id"],
                        "category_id": int(lab),
                        "segmentation": rle,
                        "area": float(mask_util.area(rle)),
                        "bbox": list(mask_util.toBbox(rle)),
                        "iscrowd": int(crowd),
                    }
                )
        for m, lab, s in zip(pred, labels, scores):
            if ds.isthing[lab]:
                dts.append(
                    {
                        "image_id": item["image_id"],
                        "category_id": int(lab),
                        "score": float(s),
                        "segmentation": mask_util.encode(np.asfortranarray(m.astype(np.uint8))),
                    }
                )
    coco = COCO()
    coco.dataset = {"images": images, "annotations": gts, "categories": things}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dts), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    got = ours.compute()
    assert got["ap"] == pytest.approx(100 * ev.stats[0], abs=1e-9)
    assert got["ap50"] == pytest.approx(100 * ev.stats[1], abs=1e-9)
    assert 0 < got["ap"] < 100
