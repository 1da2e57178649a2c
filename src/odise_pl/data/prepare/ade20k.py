"""ADE20K (SceneParse150, ``ADEChallengeData2016``) -> COCO panoptic layout + detectron2 semantic labels."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from odise_pl.data.io import ids_to_rgb
from odise_pl.data.prepare.common import need
from odise_pl.data.vocab import dataset_vocab
from odise_pl.errors import DatasetError
from odise_pl.fs import check_writable_dir

ADE_SPLITS = {"validation": "val", "training": "train"}


def ade_thing_mapping() -> dict[int, int]:
    """Instance100 class id -> SceneParse150 class id (1-based), from the official mapping table."""
    text = (
        resources.files("odise_pl.data")
        .joinpath("vocabularies", "ade20k_instance_catid_mapping.txt")
        .read_text()
    )
    mapping = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 2:
            mapping[int(cols[0])] = int(cols[1])
    return mapping


def ade_categories() -> list[dict]:
    """The 150 ADE20K categories (ids 1..150, names from the ADE-150 vocabulary, isthing from the mapping)."""
    vocab = dataset_vocab("ade150")
    things = set(ade_thing_mapping().values())
    return [
        {"id": i, "name": n[0], "isthing": int(i in things), "supercategory": ""}
        for i, n in zip(vocab.ids, vocab.names)
    ]


def ade_panoptic_image(sem: np.ndarray, inst: np.ndarray, mapping: dict[int, int], things: set[int]):
    """Semantic (H, W) 0..150 + instance (H, W, 3) -> (H, W) segment ids + segments_info.

    Things come from the instance map (one segment per (class, instance) pair); stuff from the
    semantic map; thing-class pixels without an instance, and class 0, are VOID.
    """
    ids = np.zeros(sem.shape, dtype=np.int64)
    segments = []
    for c in np.unique(sem):
        c = int(c)
        if c == 0 or c in things:
            continue
        m = sem == c
        sid = c * 1000
        ids[m] = sid
        segments.append((sid, c, m))
    cls, ins = inst[..., 0].astype(np.int64), inst[..., 1].astype(np.int64)
    pairs = np.unique(np.stack([cls[cls > 0], ins[cls > 0]], 1), axis=0) if (cls > 0).any() else []
    for k, (ic, ii) in enumerate(pairs):
        if int(ic) not in mapping:
            raise DatasetError(f"instance class {ic} is not one of ADE20K's 100 thing classes")
        c = mapping[int(ic)]
        m = (cls == ic) & (ins == ii)
        sid = c * 1000 + k + 1
        ids[m] = sid
        segments.append((sid, c, m))
    info = []
    for sid, c, m in segments:
        m = ids == sid  # things overwrite stuff where both are annotated
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        info.append(
            {
                "id": sid,
                "category_id": c,
                "iscrowd": 0,
                "area": int(m.sum()),
                "bbox": [
                    int(xs.min()),
                    int(ys.min()),
                    int(xs.max() - xs.min() + 1),
                    int(ys.max() - ys.min() + 1),
                ],
            }
        )
    return ids, info


def prepare_ade20k(root: str | Path, splits: tuple[str, ...] = ("validation",)) -> list[Path]:
    """ADEChallengeData2016 -> ``ade20k_panoptic_{val,train}[.json]`` and ``annotations_detectron2/``."""
    root = check_writable_dir(
        need(Path(root), "ADEChallengeData2016 folder")
    )  # outputs go here: before the work
    mapping, cats = ade_thing_mapping(), ade_categories()
    things = {c["id"] for c in cats if c["isthing"]}
    written = []
    for split in splits:
        short = ADE_SPLITS[split]
        img_dir = need(root / "images" / split, "ADE20K image folder")
        sem_dir = need(root / "annotations" / split, "ADE20K semantic annotations")
        inst_dir = need(
            root / "annotations_instance" / split, "ADE20K instance annotations (annotations_instance/)"
        )
        pan_dir = root / f"ade20k_panoptic_{short}"
        d2_dir = root / "annotations_detectron2" / split
        pan_dir.mkdir(exist_ok=True)
        d2_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k, img in enumerate(tqdm(sorted(img_dir.glob("*.jpg")), desc=f"ADE20K {split}", unit="image")):
            sem = np.asarray(
                Image.open(need(sem_dir / f"{img.stem}.png", "semantic annotation")), dtype=np.int64
            )
            inst = np.asarray(
                Image.open(need(inst_dir / f"{img.stem}.png", "instance annotation")).convert("RGB")
            )
            ids, info = ade_panoptic_image(sem, inst, mapping, things)
            Image.fromarray(ids_to_rgb(ids)).save(pan_dir / f"{img.stem}.png")
            Image.fromarray(np.where(sem == 0, 255, sem - 1).astype(np.uint8)).save(
                d2_dir / f"{img.stem}.png"
            )
            h, w = sem.shape
            images.append({"id": k, "file_name": img.name, "height": h, "width": w})
            annotations.append({"image_id": k, "file_name": f"{img.stem}.png", "segments_info": info})
        out = root / f"ade20k_panoptic_{short}.json"
        with open(out, "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
        written += [out, pan_dir, d2_dir]
    return written
