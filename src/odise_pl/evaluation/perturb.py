"""Perturbed panoptic predictions from ground truth, for testing and benchmarking evaluators.

Per image: segments keep, shift or erode their masks, change category, merge with a neighbour or
vanish; extra false-positive blobs appear; some pixels become VOID (unassigned) -- so matched,
unmatched, crowd-overlapping and VOID-overlapping predictions all occur.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from odise_pl.data.io import ids_to_rgb, read_ids


def perturb_image(gt: np.ndarray, segments: list[dict], cat_ids: list[int], rng: np.random.Generator):
    """(H, W) gt ids + segments_info -> (H, W) predicted ids + predicted segments_info."""
    h, w = gt.shape
    pred = np.zeros_like(gt)
    out, used = [], set()

    def new_id() -> int:
        i = int(rng.integers(1, 256**3))
        while i in used:
            i = int(rng.integers(1, 256**3))
        used.add(i)
        return i

    for s in segments:
        m = gt == s["id"]
        r = rng.random()
        if r < 0.1:
            continue  # missed
        if r < 0.3:
            dy, dx = rng.integers(-6, 7, size=2)
            m = np.roll(m, (int(dy), int(dx)), axis=(0, 1))
        elif r < 0.4:
            m = m & (rng.random(m.shape) < 0.6)  # ragged
        cat = s["category_id"] if rng.random() > 0.15 else int(rng.choice(cat_ids))
        sid = new_id()
        pred[m & (pred == 0)] = sid
        out.append({"id": sid, "category_id": cat})
    for _ in range(int(rng.integers(0, 3))):  # false positives
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        hh, ww = int(rng.integers(4, h // 2)), int(rng.integers(4, w // 2))
        sid = new_id()
        pred[y : y + hh, x : x + ww] = sid
        out.append({"id": sid, "category_id": int(rng.choice(cat_ids))})
    if rng.random() < 0.5:  # a VOID band
        y = int(rng.integers(0, h - 4))
        pred[y : y + int(rng.integers(2, 10))] = 0
    present = set(np.unique(pred).tolist())
    return pred, [s for s in out if s["id"] in present]


def write_predictions(
    gt_json: str | Path, gt_folder: str | Path, out_dir: str | Path, seed: int = 0
) -> tuple[Path, Path]:
    """Write perturbed predictions for every ground-truth image; returns (pred_json, pred_folder)."""
    rng = np.random.default_rng(seed)
    gt = json.load(open(gt_json))
    cat_ids = [c["id"] for c in gt["categories"]]
    out_dir = Path(out_dir)
    folder = out_dir / "pred"
    folder.mkdir(parents=True, exist_ok=True)
    anns = []
    for a in gt["annotations"]:
        ids = read_ids(Path(gt_folder) / a["file_name"]).astype(np.int64)
        pred, segs = perturb_image(ids, a["segments_info"], cat_ids, rng)
        Image.fromarray(ids_to_rgb(pred)).save(folder / a["file_name"])
        anns.append({"image_id": a["image_id"], "file_name": a["file_name"], "segments_info": segs})
    pred_json = out_dir / "pred.json"
    with open(pred_json, "w") as f:
        json.dump({"annotations": anns, "categories": gt["categories"]}, f)
    return pred_json, folder
