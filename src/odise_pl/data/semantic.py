"""Reader of semantic-segmentation datasets in the Mask2Former / detectron2 layout.

``ROOT/IMAGE_DIR/NAME.jpg`` with ``ROOT/LABEL_DIR/NAME.png`` (or ``.tif`` for more than 255
classes): one class index per pixel, ``0 .. K-1`` in vocabulary order, ``ignore_label`` elsewhere.
The ``scripts/prepare_*.py`` scripts write this from the official downloads.

Items have the panoptic reader's keys so one pipeline serves both: one mask per class present
(``labels``), none crowd, everything "stuff" (``isthing`` False).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from odise_pl.data.io import load_image
from odise_pl.errors import DatasetError

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def read_label(path: Path) -> np.ndarray:
    """Label PNG / TIFF -> (H, W) int64."""
    try:
        with Image.open(path) as im:
            labels = np.asarray(im).astype(np.int64)
    except OSError as err:
        raise DatasetError(f"cannot decode label map {path}: {err}") from err
    if labels.ndim != 2:
        raise DatasetError(
            f"label map {path} has {labels.shape[2]} channels; a label map holds one class value per pixel "
            "(a greyscale or palette PNG)"
        )
    return labels


class SemanticSegDataset(Dataset):
    """Args:
    root: dataset root; image_dir / label_dir: relative folders.
    label_format: ``png`` or ``tif``.
    ignore_label: value of unlabelled pixels (255; 65535 for ADE-847's TIFFs).
    num_classes: if given, labels >= num_classes (other than ignore) are an error.
    transform: item transform (``ResizeShortestEdge``).
    max_items: first N images only.
    """

    def __init__(
        self,
        *,
        root: str,
        image_dir: str,
        label_dir: str,
        label_format: str = "png",
        ignore_label: int = 255,
        num_classes: int | None = None,
        transform=None,
        max_items: int | None = None,
    ):
        self.root = Path(root)
        self.image_dir, self.label_dir = self.root / image_dir, self.root / label_dir
        for d, what in ((self.image_dir, "image"), (self.label_dir, "label")):
            if not d.is_dir():
                raise DatasetError(
                    f"{what} folder not found: {d}. Prepare the dataset with the matching scripts/prepare_*.py "
                    "(see the README's data section) or point `paths.data_dir` at where it lives"
                )
        labels = {p.stem: p for p in self.label_dir.glob(f"*.{label_format}")}
        self.items = []
        for p in sorted(self.image_dir.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS and p.stem in labels:
                self.items.append((p, labels[p.stem]))
        if not self.items:
            raise DatasetError(
                f"no image/label pairs in {self.image_dir} and {self.label_dir} (*.{label_format})"
            )
        if max_items is not None:
            self.items = self.items[:max_items]
        self.ignore_label, self.num_classes, self.transform = ignore_label, num_classes, transform
        self.isthing: list[bool] = []  # set by the vocabulary (all stuff by default)
        self.class_names: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        img_path, label_path = self.items[index]
        image = load_image(img_path)
        label = read_label(label_path)
        if label.shape != image.shape[:2]:
            raise DatasetError(
                f"size mismatch: {img_path} is {image.shape[:2]}, its labels {label_path} {label.shape}"
            )
        classes = [int(c) for c in np.unique(label) if c != self.ignore_label]
        if (
            self.num_classes is not None
            and classes
            and (max(classes) >= self.num_classes or min(classes) < 0)
        ):
            raise DatasetError(f"{label_path} has labels {classes} outside [0, {self.num_classes})")
        h, w = label.shape
        item = {
            "image": torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1),
            "masks": torch.from_numpy(np.stack([label == c for c in classes]))
            if classes
            else torch.zeros(0, h, w, dtype=torch.bool),
            "labels": torch.tensor(classes, dtype=torch.long),
            "isthing": torch.zeros(len(classes), dtype=torch.bool),
            "iscrowd": torch.zeros(len(classes), dtype=torch.bool),
            "captions": [],
            "image_id": index,
            "file_name": img_path.name,
            "height": h,
            "width": w,
        }
        return self.transform(item) if self.transform is not None else item
