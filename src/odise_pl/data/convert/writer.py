"""Writing a dataset in the COCO panoptic layout our readers take (``conf/data/custom.yaml``):

    OUT/images/{split}/*.jpg                   the images (copied, or linked with ``link=True``)
    OUT/annotations/panoptic_{split}.json      images, annotations (segments_info), categories
    OUT/annotations/panoptic_{split}/*.png     segment ids as R + 256 G + 256^2 B

The converters (:mod:`.instances`, :mod:`.semantic`) rasterise each image's segments into one id map
and hand it here; every file is written atomically, the JSON last, so an interrupted conversion
never leaves a JSON naming PNGs that are not there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from odise_pl.data.io import ids_to_rgb
from odise_pl.errors import DatasetError
from odise_pl.fs import atomic_write, check_writable_dir


def bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, w, h]`` of a boolean mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


class PanopticWriter:
    """One split of a COCO-panoptic-format dataset under ``out``.

    Args:
        out: the dataset root (created; checked writable before any work).
        split: ``train`` / ``val`` / any name: files go to ``images/{split}`` and ``annotations/panoptic_{split}*``.
        categories: ``{"id", "name", "isthing"[, "supercategory"]}`` as the JSON lists them.
        link: symlink the images instead of copying them.
    """

    def __init__(self, out: str | Path, split: str, categories: list[dict], link: bool = False):
        self.out = check_writable_dir(out)
        self.split, self.link = split, link
        self.categories = [
            {
                "id": int(c["id"]),
                "name": str(c["name"]),
                "isthing": int(bool(c.get("isthing", 1))),
                "supercategory": str(c.get("supercategory", c["name"])),
            }
            for c in categories
        ]
        self.image_dir = check_writable_dir(self.out / "images" / split)
        self.png_dir = check_writable_dir(self.out / "annotations" / f"panoptic_{split}")
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, image_path: Path, image_id: int, ids: np.ndarray, segments: list[dict]) -> None:
        """One image: its file, the (H, W) segment-id map (0: void) and ``{id, category_id,
        iscrowd}`` per segment (area and bbox are computed from the map; a segment with no pixel
        left after overlaps is dropped).
        """
        h, w = ids.shape
        stem = Path(image_path).stem
        target = self.image_dir / Path(image_path).name
        if not target.exists():
            if self.link:
                os.symlink(Path(image_path).resolve(), target)
            else:
                shutil.copyfile(image_path, target)
        info = []
        for s in segments:
            mask = ids == s["id"]
            if not mask.any():
                continue
            info.append(
                {
                    "id": int(s["id"]),
                    "category_id": int(s["category_id"]),
                    "iscrowd": int(s.get("iscrowd", 0)),
                    "area": int(mask.sum()),
                    "bbox": bbox(mask),
                }
            )
        png = f"{stem}.png"
        picture = Image.fromarray(ids_to_rgb(ids))
        atomic_write(self.png_dir / png, lambda f: picture.save(f, format="PNG"))
        self.images.append({"id": int(image_id), "file_name": target.name, "height": h, "width": w})
        self.annotations.append({"image_id": int(image_id), "file_name": png, "segments_info": info})

    def finish(self) -> Path:
        """Write the JSON (atomically, last); returns its path."""
        if not self.annotations:
            raise DatasetError(f"no image was converted into {self.out} ({self.split}): nothing to write")
        path = self.out / "annotations" / f"panoptic_{self.split}.json"
        data = {"images": self.images, "annotations": self.annotations, "categories": self.categories}
        atomic_write(path, lambda f: f.write(json.dumps(data).encode()))
        return path
