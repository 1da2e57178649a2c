"""Convert official dataset downloads into what the readers need (Mask2Former / ODISE conventions).

* ADE20K (``ADEChallengeData2016``): panoptic PNG + JSON from the semantic (150 classes) and
  instance (100 thing classes: R = class, G = instance) annotations, and ``annotations_detectron2``
  semantic labels (label - 1, 0 -> 255).
* Pascal VOC 2012: ``SegmentationClass`` palette PNGs (0..20, 255 border) -> 8-bit label PNGs.
* Pascal Context (VOC2010 + the full ``trainval/*.mat`` labels, 1..459): 459-class TIFFs (label - 1,
  unlabelled -> 65535) and 59-class PNGs (the 59 common classes by name, others -> 255).

The scripts in ``scripts/`` are the command lines; each step says what it read and wrote.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from odise_pl.data.coco_panoptic import DatasetError
from odise_pl.data.synthetic import ids_to_rgb
from odise_pl.data.vocab import dataset_vocab, parse_openseg

ADE_SPLITS = {"validation": "val", "training": "train"}


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    return path


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
    root = Path(root)
    mapping, cats = ade_thing_mapping(), ade_categories()
    things = {c["id"] for c in cats if c["isthing"]}
    written = []
    for split in splits:
        short = ADE_SPLITS[split]
        img_dir = _need(root / "images" / split, "ADE20K image folder")
        sem_dir = _need(root / "annotations" / split, "ADE20K semantic annotations")
        inst_dir = _need(
            root / "annotations_instance" / split, "ADE20K instance annotations (annotations_instance/)"
        )
        pan_dir = root / f"ade20k_panoptic_{short}"
        d2_dir = root / "annotations_detectron2" / split
        pan_dir.mkdir(exist_ok=True)
        d2_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k, img in enumerate(tqdm(sorted(img_dir.glob("*.jpg")), desc=f"ADE20K {split}")):
            sem = np.asarray(
                Image.open(_need(sem_dir / f"{img.stem}.png", "semantic annotation")), dtype=np.int64
            )
            inst = np.asarray(
                Image.open(_need(inst_dir / f"{img.stem}.png", "instance annotation")).convert("RGB")
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


def _copy_image(src: Path, dst_dir: Path) -> None:
    dst = dst_dir / src.name
    if not dst.exists():
        shutil.copyfile(src, dst)


def prepare_pascal_voc(voc2012: str | Path, out: str | Path, split: str = "val") -> Path:
    """VOC2012 -> ``OUT/images/validation`` + ``OUT/annotations_pascal21/validation`` (0..20, 255)."""
    voc2012, out = Path(voc2012), Path(out)
    names = (
        _need(voc2012 / "ImageSets" / "Segmentation" / f"{split}.txt", "VOC split list").read_text().split()
    )
    img_out, lab_out = out / "images" / "validation", out / "annotations_pascal21" / "validation"
    img_out.mkdir(parents=True, exist_ok=True)
    lab_out.mkdir(parents=True, exist_ok=True)
    for n in tqdm(names, desc="Pascal VOC"):
        _copy_image(_need(voc2012 / "JPEGImages" / f"{n}.jpg", "VOC image"), img_out)
        with Image.open(_need(voc2012 / "SegmentationClass" / f"{n}.png", "VOC label")) as im:
            lab = np.asarray(im)  # palette indices are the class ids
        if lab.ndim != 2:
            raise DatasetError(f"{voc2012 / 'SegmentationClass' / n}.png is not a palette (class-index) PNG")
        Image.fromarray(lab.astype(np.uint8)).save(lab_out / f"{n}.png")
    return out


def _plain_vocab(file: str):
    text = resources.files("odise_pl.data").joinpath("vocabularies", file).read_text(encoding="utf-8")
    return parse_openseg(text, file, strict=False)


# The 59-class list names PASCAL's "diningtable" what the 459-class list calls "table".
PC59_ALIASES = {"diningtable": "table"}


def pc59_from_459() -> np.ndarray:
    """LUT over 459 full-class ids (1-based, index 0 = unlabelled) -> 59-class index or 255, by name."""
    full, small = _plain_vocab("pascal_context_459.txt"), _plain_vocab("pascal_context_59.txt")
    index = {PC59_ALIASES.get(n[0].lower(), n[0].lower()): k for k, n in enumerate(small.names)}
    lut = np.full(max(full.ids) + 1, 255, dtype=np.uint8)
    for fid, names in zip(full.ids, full.names):
        if names[0].lower() in index:
            lut[fid] = index[names[0].lower()]
    return lut


def prepare_pascal_context(
    voc2010: str | Path, labels_dir: str | Path, out: str | Path, split_file: str | Path
) -> Path:
    """VOC2010 JPEGs + full ``.mat`` labels (``LabelMap``, 1..459, 0 unlabelled) -> 459-class TIFFs
    (label - 1, unlabelled 65535) and 59-class PNGs (255 outside the 59).
    """
    from scipy.io import loadmat

    voc2010, labels_dir, out = Path(voc2010), Path(labels_dir), Path(out)
    names = _need(Path(split_file), "split list").read_text().split()
    img_out = out / "images" / "validation"
    full_out, small_out = out / "annotations_ctx459" / "validation", out / "annotations_ctx59" / "validation"
    for d in (img_out, full_out, small_out):
        d.mkdir(parents=True, exist_ok=True)
    lut59 = pc59_from_459()
    for n in tqdm(names, desc="Pascal Context"):
        _copy_image(_need(voc2010 / "JPEGImages" / f"{n}.jpg", "VOC2010 image"), img_out)
        mat = loadmat(str(_need(labels_dir / f"{n}.mat", "Pascal Context label")))
        if "LabelMap" not in mat:
            raise DatasetError(
                f"{labels_dir / n}.mat has no 'LabelMap' (is it the full 459-class trainval set?)"
            )
        lab = mat["LabelMap"].astype(np.int64)
        Image.fromarray(np.where(lab == 0, 65535, lab - 1).astype(np.uint16)).save(full_out / f"{n}.tif")
        Image.fromarray(lut59[np.clip(lab, 0, len(lut59) - 1)]).save(small_out / f"{n}.png")
    return out
