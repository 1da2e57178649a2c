"""Converters from annotation tools' exports to COCO panoptic: round trips pixel by pixel against
masks made here (overlaps resolved by the stated rule, computed by brute force), read back by our
real reader; bad inputs one line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from odise_pl.data.coco_panoptic import COCOPanopticDataset
from odise_pl.data.convert import convert_instances, convert_semantic
from odise_pl.data.io import read_ids
from odise_pl.errors import DatasetError, OutputError

ROOT = Path(__file__).resolve().parents[1]
H, W = 48, 64
CATEGORIES = [
    {"id": 1, "name": "apple", "supercategory": "fruit"},
    {"id": 2, "name": "banana", "supercategory": "fruit"},
    {"id": 7, "name": "table", "isthing": 0},
    {"id": 9, "name": "wall", "isthing": 0},
]


def rect(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(mask: np.ndarray) -> dict:
    out = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": out["size"], "counts": out["counts"].decode()}


def write_export(tmp: Path) -> tuple[Path, Path, Path, dict]:
    """An export as an annotation tool writes it: 3 images, instances as RLE and polygons, an
    overlap, a crowd region, an image without instances, stuff as label PNGs. Returns (json,
    images, semantic folder, expected per image: (instance masks, category ids, crowd, stuff map))."""
    images, sem = tmp / "images", tmp / "stuff"
    images.mkdir()
    sem.mkdir()
    rng = np.random.default_rng(0)
    polygon = [[10.0, 5.0, 30.0, 5.0, 30.0, 25.0, 10.0, 25.0]]
    polygon_mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W))).astype(bool)
    plan = {
        1: [
            (rect(0, 30, 0, 40), 2, 0, rle),
            (rect(10, 20, 10, 20), 1, 0, rle),
            (polygon_mask, 1, 0, polygon),
        ],
        2: [(rect(5, 45, 30, 60), 1, 1, rle)],  # crowd
        3: [],  # no instance: all stuff / void
    }
    anns, expected = [], {}
    for image_id, items in plan.items():
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / f"img{image_id}.jpg")
        stuff = np.zeros((H, W), np.uint8)
        stuff[H // 2 :, :] = 7
        stuff[: H // 4, :] = 9
        stuff[0, 0] = 255
        Image.fromarray(stuff).save(sem / f"img{image_id}.png")
        for mask, cat, crowd, enc in items:
            seg = enc if isinstance(enc, list) else enc(mask)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": crowd,
                         "segmentation": seg, "area": int(mask.sum()), "bbox": [0, 0, 1, 1]})  # fmt: skip
        expected[image_id] = (
            [m for m, *_ in items],
            [c for _, c, *_ in items],
            [k for *_, k, _ in items],
            stuff,
        )
    data = {
        "images": [{"id": i, "file_name": f"img{i}.jpg", "height": H, "width": W} for i in plan],
        "annotations": anns,
        "categories": CATEGORIES,
    }
    path = tmp / "instances.json"
    path.write_text(json.dumps(data))
    return path, images, sem, expected


def brute_force(masks, cats, crowds, stuff) -> dict:
    """pixel -> (category, crowd) by the stated rule: the smallest covering instance, else stuff."""
    out = {}
    for y in range(H):
        for x in range(W):
            covering = [k for k, m in enumerate(masks) if m[y, x]]
            if covering:
                k = min(covering, key=lambda k: (masks[k].sum(), k))
                out[y, x] = ("inst", k, cats[k], crowds[k])
            elif stuff[y, x] in (7, 9):
                out[y, x] = ("stuff", None, int(stuff[y, x]), 0)
    return out


def test_instances_round_trip_pixel_by_pixel(tmp_path):
    src, images, sem, expected = write_export(tmp_path)
    out = tmp_path / "custom"
    pan = convert_instances(src, images, out, "train", semantic_dir=sem, progress=False)
    data = json.loads(pan.read_text())
    assert {c["name"]: c["isthing"] for c in data["categories"]} == {
        "apple": 1,
        "banana": 1,
        "table": 0,
        "wall": 0,
    }
    for ann in data["annotations"]:
        ids = read_ids(out / "annotations" / "panoptic_train" / ann["file_name"])
        info = {s["id"]: s for s in ann["segments_info"]}
        want = brute_force(*expected[ann["image_id"]])
        got_instance = {}
        for y in range(H):
            for x in range(W):
                seg = info.get(int(ids[y, x]))
                if (y, x) not in want:
                    assert seg is None, (ann["image_id"], y, x)
                    continue
                kind, k, cat, crowd = want[y, x]
                assert seg is not None and seg["category_id"] == cat and seg["iscrowd"] == crowd, (y, x)
                if kind == "inst":  # one segment per instance, and each instance one segment
                    assert got_instance.setdefault(k, seg["id"]) == seg["id"]
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum())
    # the real reader takes it
    ds = COCOPanopticDataset(
        root=str(out), split="train", captions=False, image_dir="images/train",
        panoptic_json="annotations/panoptic_train.json", panoptic_dir="annotations/panoptic_train",
    )  # fmt: skip
    assert len(ds) == 3 and [c["name"] for c in ds.categories] == ["apple", "banana", "table", "wall"]
    assert ds[0]["image"].shape[-2:] == (H, W)


@pytest.mark.parametrize("case, message", [
    ("unknown_category", "category_id 5, which is not in its 'categories' list"),
    ("missing_image", "image img2.jpg of"),
    ("empty", "the annotation list is empty"),
    ("stuff_value", "has pixel values [3], not stuff categories"),
    ("bad_rle", "cannot decode its segmentation"),
])  # fmt: skip
def test_bad_instance_exports_are_one_line(tmp_path, case, message):
    src, images, sem, _ = write_export(tmp_path)
    data = json.loads(src.read_text())
    semantic = None
    if case == "unknown_category":
        data["annotations"][0]["category_id"] = 5
    elif case == "missing_image":
        (images / "img2.jpg").unlink()
    elif case == "empty":
        data["annotations"] = []
    elif case == "stuff_value":
        semantic = sem
        Image.fromarray(np.full((H, W), 3, np.uint8)).save(sem / "img1.png")
    elif case == "bad_rle":
        data["annotations"][0]["segmentation"] = {"size": [H, W], "counts": 12}
    src.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        convert_instances(src, images, tmp_path / "out", semantic_dir=semantic, progress=False)


def test_an_unusable_output_is_refused_before_converting(tmp_path):
    src, images, _, _ = write_export(tmp_path)
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputError, match="is not a folder"):
        convert_instances(src, images, tmp_path / "out", progress=False)


def test_semantic_folder_round_trip(tmp_path):
    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(1)
    maps = {}
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / f"s{i}.png")
        lab = rng.integers(0, 5, (H, W)).astype(np.uint8)  # 4 is not in the class list: void
        lab[:4, :4] = 255
        Image.fromarray(lab).save(labels / f"s{i}.png")
        maps[f"s{i}.png"] = lab
    classes = tmp_path / "classes.txt"
    classes.write_text("sky\ngrass,lawn\nroad\nwall\n")  # pixel value = line index
    pan = convert_semantic(images, labels, classes, tmp_path / "out", "val", progress=False)
    data = json.loads(pan.read_text())
    assert [c["name"] for c in data["categories"]] == ["sky", "grass", "road", "wall"]
    assert all(c["isthing"] == 0 for c in data["categories"])
    for img, ann in zip(data["images"], data["annotations"]):
        ids = read_ids(tmp_path / "out" / "annotations" / "panoptic_val" / ann["file_name"])
        cat_of = {s["id"]: s["category_id"] for s in ann["segments_info"]}
        lab = maps[img["file_name"]]
        got = np.vectorize(lambda v, c=cat_of: c.get(int(v), -1))(ids)
        want = np.where(np.isin(lab, [0, 1, 2, 3]), lab.astype(np.int64), -1)
        np.testing.assert_array_equal(got, want)


def test_scripts_convert_with_one_line_errors(tmp_path):
    src, images, sem, _ = write_export(tmp_path)
    cmd = [sys.executable, str(ROOT / "scripts" / "convert_coco_instances.py"), "--instances", str(src),
           "--images", str(images), "--out", str(tmp_path / "out"), "--semantic", str(sem)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "wrote" in res.stdout, res.stderr[-2000:]
    res = subprocess.run(
        [*cmd[:-2]], capture_output=True, text=True, timeout=300
    )  # no --semantic: stuff ids dropped
    assert res.returncode == 0, res.stderr[-2000:]
    bad = subprocess.run([*cmd[:3], str(tmp_path / "nope.json"), *cmd[4:]], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_semantic_folder.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "--classes" in res.stdout
