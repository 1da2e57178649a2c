"""PQ evaluation speed: ours vs the COCO panoptic API's algorithm (panopticapi) on the same files.

Prints `name: ours X, baseline Y, ratio Z` (ratio = ours / baseline; < 1 is faster), and the
floor: just decoding the PNGs. Identical numbers are asserted before timing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from odise_pl.data.io import ids_to_rgb
from odise_pl.data.synthetic import write_dataset
from odise_pl.evaluation.panoptic_quality import evaluate_files, read_ids
from odise_pl.evaluation.perturb import write_predictions


def make_data(root: Path, n: int, scale: int, instances: int = 0) -> tuple[Path, Path, Path, Path]:
    write_dataset(root, num_train=1, num_val=n, seed=0)
    gt_json = root / "annotations" / "panoptic_val2017.json"
    gt_dir = root / "annotations" / "panoptic_val2017"
    gt = json.load(open(gt_json))
    things = [c["id"] for c in gt["categories"] if c.get("isthing")]
    rng = np.random.default_rng(0)
    for a in gt["annotations"]:
        p = gt_dir / a["file_name"]
        ids = read_ids(p).astype(np.int64)
        if scale > 1:  # realistic sizes: nearest upscaling keeps ids exact
            ids = ids.repeat(scale, 0).repeat(scale, 1)
        # COCO-like scenes: the synthetic ones have ~5 segments; COCO val has ~11 per image and
        # predictions more. Extra object instances (rectangles) make the per-segment work realistic.
        for k in range(instances):
            h, w = ids.shape
            dy, dx = rng.integers(h // 20, h // 4), rng.integers(w // 20, w // 4)
            y, x = rng.integers(0, h - dy), rng.integers(0, w - dx)
            ids[y : y + dy, x : x + dx] = 5000 + k
            a["segments_info"].append({"id": 5000 + k, "category_id": int(rng.choice(things)), "iscrowd": 0})
        present, counts = np.unique(ids, return_counts=True)
        area = dict(zip(present.tolist(), counts.tolist()))
        a["segments_info"] = [dict(s, area=area[s["id"]]) for s in a["segments_info"] if s["id"] in area]
        Image.fromarray(ids_to_rgb(ids)).save(p)
    json.dump(gt, open(gt_json, "w"))
    pred_json, pred_dir = write_predictions(gt_json, gt_dir, root / "pred", seed=1)
    return gt_json, gt_dir, pred_json, pred_dir


def coco_api(gt_json, gt_dir, pred_json, pred_dir, workers: int) -> tuple[dict, float]:
    from panopticapi import evaluation as ev

    gt, pred = json.load(open(gt_json)), json.load(open(pred_json))
    cats = {c["id"]: c for c in gt["categories"]}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    matched = [(a, preds[a["image_id"]]) for a in gt["annotations"]]
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if workers == 1:
            stat = ev.pq_compute_single_core(0, matched, str(gt_dir), str(pred_dir), cats)
        else:
            chunks = np.array_split(matched, workers)
            with multiprocessing.Pool(workers) as pool:
                parts = [
                    pool.apply_async(ev.pq_compute_single_core, (i, c, str(gt_dir), str(pred_dir), cats))
                    for i, c in enumerate(chunks)
                ]
                stat = ev.PQStat()
                for p in parts:
                    stat += p.get()
    elapsed = time.perf_counter() - t
    return stat.pq_average(cats, None)[0], elapsed


def _decode_shape(path: Path) -> tuple[int, ...]:
    return read_ids(path).shape  # return only the shape: shipping arrays back would time pickling


def decode_only(gt_dir: Path, pred_dir: Path, workers: int) -> float:
    files = [p for p in sorted(gt_dir.glob("*.png"))] + [p for p in sorted(pred_dir.glob("*.png"))]
    t = time.perf_counter()
    if workers == 1:
        for f in files:
            read_ids(f)
    else:
        with multiprocessing.Pool(workers) as pool:
            pool.map(_decode_shape, files, chunksize=max(1, len(files) // (4 * workers)))
    return time.perf_counter() - t


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        out, t = fn()
        times.append(t)
    return out, min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=200)
    p.add_argument(
        "--scale", type=int, default=4, help="upscale the synthetic 128-192 px scenes (4: 512-768 px)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--instances", type=int, default=10, help="extra object instances per image (COCO-like)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="seconds-long smoke run (what the test suite runs): small sizes, one repeat",
    )
    a = p.parse_args(argv)
    if a.tiny:
        a.images, a.scale, a.repeats, a.instances = 6, 1, 1, 2
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        gt_json, gt_dir, pred_json, pred_dir = make_data(Path(tmp), a.images, a.scale, a.instances)
        segs = np.mean([len(x["segments_info"]) for x in json.load(open(gt_json))["annotations"]])
        print(f"{a.images} images, {segs:.1f} ground-truth segments per image on average")
        for workers in sorted({1, cores}):
            ref, t_ref = best_of(
                lambda w=workers: coco_api(gt_json, gt_dir, pred_json, pred_dir, w), a.repeats
            )

            def ours(w=workers):
                t = time.perf_counter()
                r = evaluate_files(gt_json, gt_dir, pred_json, pred_dir, workers=w)
                return r, time.perf_counter() - t

            res, t_ours = best_of(ours, a.repeats)
            assert abs(res["All"]["pq"] - ref["pq"]) < 1e-9, (res["All"], ref)
            t_dec = min(decode_only(gt_dir, pred_dir, workers) for _ in range(a.repeats))
            tag = f"pq_eval[{a.images} images x {a.scale}x, {workers} proc]"
            print(f"{tag}: decoding is {t_dec / t_ref:.0%} of the COCO panoptic API's time")
            print(f"{tag}: ours {t_ours:.3f}s, baseline {t_ref:.3f}s, ratio {t_ours / t_ref:.2f}")
            print(
                f"{tag} vs decode floor: ours {t_ours:.3f}s, baseline {t_dec:.3f}s, ratio {t_ours / t_dec:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
