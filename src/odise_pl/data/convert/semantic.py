"""A semantic-segmentation folder (images + label PNGs + a class list) -> COCO panoptic with stuff
segments only: one segment per class present in an image (semantic labels cannot tell instances
apart, so every class is stuff and panoptic quality measures it as such).

The class list is a vocabulary file (:func:`odise_pl.data.vocab.load_vocab_file`): ``id:name,synonym``
lines, where ``id`` is the pixel value, or one ``name,synonym`` per line, where the pixel value is
the line's index (0-based). Pixels equal to ``ignore`` (default 255) and values the list does not
name are void; an image without its label PNG is an error naming both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from odise_pl.data.convert.writer import PanopticWriter
from odise_pl.data.semantic import read_label
from odise_pl.data.vocab import load_vocab_file
from odise_pl.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def convert_semantic(
    image_dir: str | Path,
    label_dir: str | Path,
    classes: str | Path,
    out: str | Path,
    split: str = "train",
    ignore: int = 255,
    link: bool = False,
    progress: bool = True,
) -> Path:
    """Convert one split (see the module docstring); returns the panoptic JSON written."""
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    vocab = load_vocab_file(classes)
    categories = [
        {"id": int(i), "name": names[0], "isthing": 0} for i, names in sorted(zip(vocab.ids, vocab.names))
    ]
    known = {c["id"] for c in categories}
    if ignore in known:
        raise DatasetError(
            f"{classes} names class id {ignore}, the ignore value: give --ignore another value"
        )
    if not image_dir.is_dir():
        raise DatasetError(f"image folder not found: {image_dir}")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    writer = PanopticWriter(out, split, categories, link=link)  # checks the output first
    for image_id, path in enumerate(
        tqdm(images, desc=f"converting {split}", unit="img", disable=not progress), 1
    ):
        label_png = label_dir / f"{path.stem}.png"
        if not label_png.is_file():
            raise DatasetError(f"image {path.name} has no label PNG {label_png}")
        labels = read_label(label_png)
        ids = np.zeros(labels.shape, dtype=np.int64)
        segments = []
        for v in sorted(set(np.unique(labels).tolist()) & known):
            ids[labels == v] = len(segments) + 1
            segments.append({"id": len(segments) + 1, "category_id": int(v), "iscrowd": 0})
        writer.add(path, image_id, ids, segments)
    return writer.finish()
