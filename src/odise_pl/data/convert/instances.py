"""COCO *instance* annotations (what CVAT, Label Studio and labelme2coco export) -> COCO panoptic.

Input: the instance JSON (``images``, ``annotations`` with ``segmentation`` as polygons, RLE or
uncompressed RLE, ``categories``), the image folder and, optionally, a folder of semantic label PNGs
for stuff (pixel value = a stuff category's id; 0 and 255 are unlabelled).

Rules, stated and tested (``tests/test_convert_datasets.py``):

- **categories** are the JSON's; a category is a thing unless its entry says ``"isthing": 0`` or
  its id is given in ``stuff_ids``; an annotation of a category not in the list is an error naming it;
- **overlaps**: a pixel claimed by several instances goes to the *smallest* of them (by its own
  area): a cup drawn over a table stays a cup, whatever order the tool exported them in;
- **crowd** regions (``iscrowd: 1``) stay crowd segments (evaluation ignores predictions there);
- **stuff** from the semantic PNGs fills only pixels no instance claimed, one segment per stuff
  category per image; a value that is not a stuff category is an error naming the file;
- an image without annotations is kept, all void; an image file that is missing is an error
  naming it; an annotation list that is empty (and no semantic folder) is an error.

Masks are decoded by pycocotools (``frPyObjects`` / ``decode``): polygons are rasterised exactly
as the COCO API and its evaluation do. What pycocotools lacks, merging instances and stuff into one
id map under the rules above, is ours (panopticapi's combiner is for scored *predictions*: it drops
instances by an overlap threshold, which would delete ground truth).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from odise_pl.data.convert.writer import PanopticWriter
from odise_pl.data.io import read_json
from odise_pl.errors import DatasetError

VOID_VALUES = (0, 255)


def decode_segmentation(segmentation, height: int, width: int, where: str) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, RLE or uncompressed RLE) -> (H, W) bool mask."""
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segmentation, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
            polygons = [p for p in segmentation if len(p) >= 6]
            if not polygons:
                return np.zeros((height, width), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode()
        else:
            raise TypeError(f"a {type(segmentation).__name__}")
        mask = mask_utils.decode(rle)
    except Exception as err:  # pycocotools raises plain Exceptions / TypeErrors for malformed input
        raise DatasetError(f"{where}: cannot decode its segmentation ({err})") from None
    if mask.shape[:2] != (height, width):
        raise DatasetError(f"{where}: its RLE is {mask.shape[1]}x{mask.shape[0]}, the image {width}x{height}")
    return mask.astype(bool)


def merge_instances(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int: 1 + the index of the instance each pixel belongs to (0: none); overlaps go to
    the smallest instance.
    """
    out = np.zeros(shape, dtype=np.int64)
    best = np.full(shape, np.iinfo(np.int64).max)
    for k, m in enumerate(masks):
        area = int(m.sum())
        take = m & (area < best)
        out[take], best[take] = k + 1, area
    return out


def convert_instances(
    instances_json: str | Path,
    image_dir: str | Path,
    out: str | Path,
    split: str = "train",
    semantic_dir: str | Path | None = None,
    stuff_ids: tuple[int, ...] = (),
    link: bool = False,
    progress: bool = True,
) -> Path:
    """Convert one split (see the module docstring); returns the panoptic JSON written."""
    instances_json, image_dir = Path(instances_json), Path(image_dir)
    data = read_json(
        instances_json, "instance annotation file", "give the JSON your annotation tool exported"
    )
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DatasetError(
            f"{instances_json}: not a COCO instance file (needs 'images' and 'categories' lists)"
        )
    anns = data.get("annotations") or []
    if not anns and semantic_dir is None:
        raise DatasetError(f"{instances_json}: the annotation list is empty: nothing to convert")
    cats = {int(c["id"]): c for c in data["categories"]}
    stuff = {i for i, c in cats.items() if i in stuff_ids or c.get("isthing", 1) == 0}
    categories = [{**c, "isthing": int(i not in stuff)} for i, c in sorted(cats.items())]
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        if int(a.get("category_id", -1)) not in cats:
            raise DatasetError(
                f"{instances_json}: annotation {a.get('id')} has category_id {a.get('category_id')!r}, "
                f"which is not in its 'categories' list ({sorted(cats)[:10]}...)"
            )
        by_image.setdefault(int(a["image_id"]), []).append(a)
    writer = PanopticWriter(out, split, categories, link=link)  # checks the output first
    for img in tqdm(data["images"], desc=f"converting {split}", unit="img", disable=not progress):
        path = image_dir / img["file_name"]
        if not path.is_file():
            raise DatasetError(f"image {img['file_name']} of {instances_json} not found in {image_dir}")
        h, w = int(img["height"]), int(img["width"])
        items = [a for a in by_image.get(int(img["id"]), []) if int(a["category_id"]) not in stuff]
        masks = [
            decode_segmentation(a["segmentation"], h, w, f"{instances_json}: annotation {a.get('id')}")
            for a in items
        ]
        owner = merge_instances(masks, (h, w))
        ids = owner.copy()  # segment k + 1 is instance k
        segments = [
            {"id": k + 1, "category_id": int(a["category_id"]), "iscrowd": int(a.get("iscrowd", 0))}
            for k, a in enumerate(items)
        ]
        if semantic_dir is not None:
            segments += _add_stuff(ids, Path(semantic_dir) / f"{path.stem}.png", stuff, len(items) + 1)
        writer.add(path, int(img["id"]), ids, segments)
    return writer.finish()


def _add_stuff(ids: np.ndarray, label_png: Path, stuff: set[int], next_id: int) -> list[dict]:
    """Fill the unclaimed pixels of ``ids`` from a semantic label PNG (in place); the segments added."""
    from odise_pl.data.semantic import read_label

    if not label_png.is_file():
        raise DatasetError(f"semantic label {label_png} not found (one PNG per image, named as the image)")
    labels = read_label(label_png)
    if labels.shape != ids.shape:
        raise DatasetError(
            f"{label_png} is {labels.shape[1]}x{labels.shape[0]}, its image {ids.shape[1]}x{ids.shape[0]}"
        )
    values = sorted(set(np.unique(labels).tolist()) - set(VOID_VALUES))
    unknown = [v for v in values if v not in stuff]
    if unknown:
        raise DatasetError(
            f"{label_png} has pixel values {unknown[:5]}, not stuff categories ({sorted(stuff)[:10]}); "
            "its values must be the ids of the stuff categories (0 / 255: unlabelled)"
        )
    out = []
    free = ids == 0
    for v in values:
        mask = free & (labels == v)
        if mask.any():
            ids[mask] = next_id
            out.append({"id": next_id, "category_id": int(v), "iscrowd": 0})
            next_id += 1
    return out
