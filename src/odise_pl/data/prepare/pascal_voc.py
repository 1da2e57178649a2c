"""Pascal VOC 2012 -> 8-bit label PNGs (0..20, 255 border) beside the images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from odise_pl.data.prepare.common import copy_image, need, within
from odise_pl.errors import DatasetError
from odise_pl.fs import check_writable_dir


def prepare_pascal_voc(voc2012: str | Path, out: str | Path, split: str = "val") -> Path:
    """VOC2012 -> ``OUT/images/validation`` + ``OUT/annotations_pascal21/validation`` (0..20, 255)."""
    voc2012, out = Path(voc2012), check_writable_dir(out)
    names = (
        need(voc2012 / "ImageSets" / "Segmentation" / f"{split}.txt", "VOC split list").read_text().split()
    )
    img_out, lab_out = out / "images" / "validation", out / "annotations_pascal21" / "validation"
    img_out.mkdir(parents=True, exist_ok=True)
    lab_out.mkdir(parents=True, exist_ok=True)
    for n in tqdm(names, desc="Pascal VOC", unit="image"):
        copy_image(need(within(voc2012 / "JPEGImages", f"{n}.jpg"), "VOC image"), img_out)
        with Image.open(need(within(voc2012 / "SegmentationClass", f"{n}.png"), "VOC label")) as im:
            lab = np.asarray(im)  # palette indices are the class ids
        if lab.ndim != 2:
            raise DatasetError(f"{voc2012 / 'SegmentationClass' / n}.png is not a palette (class-index) PNG")
        Image.fromarray(lab.astype(np.uint8)).save(within(lab_out, f"{n}.png"))
    return out
