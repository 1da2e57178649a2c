"""Pascal Context (VOC2010 + the full 459-class ``.mat`` labels) -> 459-class TIFFs and 59-class PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from odise_pl.data.prepare.common import copy_image, need, plain_vocab, within
from odise_pl.errors import DatasetError
from odise_pl.fs import check_writable_dir

# The 59-class list names PASCAL's "diningtable" what the 459-class list calls "table".
PC59_ALIASES = {"diningtable": "table"}


def pc59_from_459() -> np.ndarray:
    """LUT over 459 full-class ids (1-based, index 0 = unlabelled) -> 59-class index or 255, by name."""
    full, small = plain_vocab("pascal_context_459.txt"), plain_vocab("pascal_context_59.txt")
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

    voc2010, labels_dir, out = Path(voc2010), Path(labels_dir), check_writable_dir(out)
    names = need(Path(split_file), "split list").read_text().split()
    img_out = out / "images" / "validation"
    full_out, small_out = out / "annotations_ctx459" / "validation", out / "annotations_ctx59" / "validation"
    for d in (img_out, full_out, small_out):
        d.mkdir(parents=True, exist_ok=True)
    lut59 = pc59_from_459()
    for n in tqdm(names, desc="Pascal Context", unit="image"):
        copy_image(need(within(voc2010 / "JPEGImages", f"{n}.jpg"), "VOC2010 image"), img_out)
        mat = loadmat(str(need(within(labels_dir, f"{n}.mat"), "Pascal Context label")))
        if "LabelMap" not in mat:
            raise DatasetError(
                f"{labels_dir / n}.mat has no 'LabelMap' (is it the full 459-class trainval set?)"
            )
        lab = mat["LabelMap"].astype(np.int64)
        Image.fromarray(np.where(lab == 0, 65535, lab - 1).astype(np.uint16)).save(
            within(full_out, f"{n}.tif")
        )
        Image.fromarray(lut59[np.clip(lab, 0, len(lut59) - 1)]).save(within(small_out, f"{n}.png"))
    return out
