"""Reader of the COCO panoptic layout (also what the ADE20K / other preparation scripts write).

Layout (defaults; every path can be overridden)::

    ROOT/{split}2017/*.jpg                          images
    ROOT/annotations/panoptic_{split}2017.json      images, annotations (segments_info), categories
    ROOT/annotations/panoptic_{split}2017/*.png     id = R + 256 G + 256^2 B, 0 = VOID
    ROOT/annotations/captions_{split}2017.json      optional: COCO captions

One item (before transforms)::

    image:    (3, H, W) uint8
    masks:    (N, H, W) bool     one per segment in segments_info
    labels:   (N,) int64         contiguous category index (categories sorted by id)
    isthing:  (N,) bool
    iscrowd:  (N,) bool
    captions: list[str]          all captions of the image ([] when captions are off)
    image_id, file_name, height, width
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from odise_pl.data.io import is_json, json_kind, load_image, read_ids, read_json
from odise_pl.errors import DatasetError


def _duplicates(values) -> list:
    seen, dup = set(), []
    for v in values:
        if v in seen and v not in dup:
            dup.append(v)
        seen.add(v)
    return dup


def check_panoptic_json(data: dict, path: Path) -> None:
    """Check a COCO panoptic annotation dict up front (keys, unique ids, known image / category ids),
    so that a broken file fails at start-up naming the entry, not hours into training.
    """

    def fail(problem: str) -> None:
        raise DatasetError(
            f"{path}: {problem}. Not a valid COCO panoptic annotation file: re-download it or fix the "
            "script that wrote it (format: https://cocodataset.org/#format-data, 'Panoptic Segmentation')"
        )

    if not isinstance(data, dict):
        fail("the top level is not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            fail(
                f"no '{key}' list"
                if data.get(key) is None
                else f"'{key}' is {json_kind(data[key])}, not a list"
            )
    # field -> the JSON types it may have (ids are integers in COCO; a list or null is a broken writer)
    required = {
        "categories": {"id": int, "name": str},
        "images": {"id": int, "file_name": str},
        "annotations": {"image_id": int, "file_name": str, "segments_info": list},
    }
    for key, fields in required.items():
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                fail(f"{key}[{i}] is {json_kind(entry)}, not an object")
            missing = [f for f in fields if f not in entry]
            if missing:
                fail(f"{key}[{i}] has no {', '.join(repr(m) for m in missing)}")
            for f, kind in fields.items():
                if not is_json(entry[f], kind):
                    fail(f"{key}[{i}].{f} is {json_kind(entry[f])} {entry[f]!r:.40}, not {json_kind(kind())}")
    if not data["annotations"]:
        fail("'annotations' is empty: the file describes no image")
    for key, field, what in (
        ("categories", "id", "category id"),
        ("images", "id", "image id"),
        ("annotations", "image_id", "annotation for image_id"),
    ):
        dup = _duplicates(e[field] for e in data[key])
        if dup:
            fail(f"{what} {dup[:5]} appears more than once in '{key}'")
    images = {im["id"] for im in data["images"]}
    categories = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        name = ann["file_name"]
        if ann["image_id"] not in images:
            fail(f"annotation {name} names image_id {ann['image_id']}, which is not in its 'images' list")
        for j, seg in enumerate(ann["segments_info"]):
            if not isinstance(seg, dict):
                fail(f"annotations[{i}].segments_info[{j}] of {name} is {json_kind(seg)}, not an object")
            missing = [f for f in ("id", "category_id") if f not in seg]
            if missing:
                fail(f"segments_info[{j}] of {name} has no {', '.join(repr(m) for m in missing)}")
            for f in ("id", "category_id"):
                if not is_json(seg[f], int):
                    fail(
                        f"annotations[{i}].segments_info[{j}].{f} of {name} is {json_kind(seg[f])} {seg[f]!r:.40}, not an integer"
                    )
            if seg["category_id"] not in categories:
                fail(
                    f"segment {seg['id']} of {name} has category_id {seg['category_id']}, not in 'categories'"
                )
        dup = _duplicates(seg["id"] for seg in ann["segments_info"])
        if dup:
            fail(f"segment ids {dup[:5]} appear more than once in the segments_info of {name}")


class COCOPanopticDataset(Dataset):
    """COCO-panoptic-format dataset (see module docstring).

    Args:
        root: dataset root.
        split: ``train`` / ``val``; fills the default paths.
        captions: also read ``captions_{split}2017.json`` (needed for caption supervision and the
            ``text`` captioner).
        transform: callable on an item dict (e.g. :class:`~odise_pl.data.transforms.LSJ`).
        image_dir, panoptic_json, panoptic_dir, captions_json: override the default paths
            (relative to ``root`` or absolute).
        max_items: only the first N images (debugging, tests).
        caption_source: ``dataset`` (the captions file), ``heuristic`` ("a photo of" + the names of
            the categories present: Table 4's heuristic captioner) or a path to a JSON caption file
            mapping image file names to a caption or a list of captions (e.g. BLIP outputs).
    """

    def __init__(
        self,
        *,
        root: str,
        split: str = "train",
        captions: bool = True,
        transform=None,
        image_dir: str | None = None,
        panoptic_json: str | None = None,
        panoptic_dir: str | None = None,
        captions_json: str | None = None,
        max_items: int | None = None,
        caption_source: str = "dataset",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset root not found: {self.root}. Point `paths.coco` (or `data.train_dataset.root`) at a COCO-panoptic-format folder, or write "
                f"the synthetic one with `python -m odise_pl.data.synthetic --out {self.root}`"
            )
        self.image_dir = self.root / (image_dir or f"{split}2017")
        self.panoptic_dir = self.root / (panoptic_dir or f"annotations/panoptic_{split}2017")
        pan_json = self.root / (panoptic_json or f"annotations/panoptic_{split}2017.json")
        data = read_json(
            pan_json,
            "panoptic annotation file",
            "Download panoptic_annotations_trainval2017 from cocodataset.org and unzip it under <root>/annotations "
            "(or run the preparation script in scripts/ for other datasets)",
        )
        check_panoptic_json(data, pan_json)
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_to_contiguous = {c["id"]: i for i, c in enumerate(self.categories)}
        self.class_names = [c["name"] for c in self.categories]
        self.isthing = [bool(c.get("isthing", 1)) for c in self.categories]
        images = {im["id"]: im for im in data["images"]}
        self.items = [(images[ann["image_id"]], ann) for ann in data["annotations"]]
        self.items.sort(key=lambda it: it[0]["id"])
        if max_items is not None:
            self.items = self.items[:max_items]
        self.panoptic_json = pan_json

        self.captions: dict[int, list[str]] = {}
        self.captions_json = self.root / (captions_json or f"annotations/captions_{split}2017.json")
        self.caption_source = caption_source
        self.caption_file: dict[str, list[str]] | None = None
        if caption_source not in ("dataset", "heuristic"):
            path = Path(caption_source)
            data = read_json(
                path, "caption file", "give a JSON object {image file name: caption or [captions]}"
            )
            if not isinstance(data, dict):
                raise DatasetError(f"caption file {path} must map image file names to captions")
            self.caption_file = {k: ([v] if isinstance(v, str) else list(v)) for k, v in data.items()}
            captions = False
        elif caption_source == "heuristic":
            captions = False
        self.read_captions = captions
        if captions:
            cap = read_json(
                self.captions_json,
                "captions file",
                "Download annotations_trainval2017 (captions_*.json) from cocodataset.org into <root>/annotations, "
                "point `data.train_dataset.captions_json` at it, or turn captions off with `data.train_dataset.captions=false` "
                "(label supervision with the implicit or empty captioner needs none)",
            )
            if not isinstance(cap, dict) or not isinstance(cap.get("annotations"), list):
                raise DatasetError(
                    f"{self.captions_json}: expected an object with an 'annotations' list (COCO captions format), "
                    f"got {json_kind(cap)}{'' if not isinstance(cap, dict) else ' without it'}; re-download annotations_trainval2017"
                )
            for i, a in enumerate(cap["annotations"]):
                if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
                    raise DatasetError(
                        f"{self.captions_json}: annotations[{i}] needs 'image_id' and a string 'caption' "
                        "(COCO captions format); re-download annotations_trainval2017"
                    )
                self.captions.setdefault(a["image_id"], []).append(a["caption"])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    @property
    def provides_captions(self) -> bool:
        """Whether items carry captions (the captions file, the heuristic or a caption file)."""
        return self.read_captions or self.caption_source != "dataset"

    def _captions(self, info: dict, labels: list[int]) -> list[str]:
        if self.caption_source == "heuristic":
            names = list(dict.fromkeys(self.class_names[k] for k in labels))
            return ["a photo of " + (", ".join(names) if names else "a scene") + "."]
        if self.caption_file is not None:
            if info["file_name"] not in self.caption_file:
                raise DatasetError(
                    f"caption file {self.caption_source} has no caption for {info['file_name']}"
                )
            return list(self.caption_file[info["file_name"]])
        return list(self.captions.get(info["id"], []))

    def read_panoptic(self, index: int) -> tuple[np.ndarray, list[dict]]:
        """(H, W) uint32 segment ids of item ``index`` and its checked segments_info."""
        info, ann = self.items[index]
        png = self.panoptic_dir / ann["file_name"]
        if not png.is_file():
            raise DatasetError(f"panoptic PNG not found: {png} (listed in {self.panoptic_json})")
        ids = read_ids(png)
        segments = ann["segments_info"]
        known = {s["id"] for s in segments}
        present = set(np.unique(ids).tolist()) - {0}
        unknown = sorted(present - known)
        if unknown:
            raise DatasetError(
                f"panoptic PNG {png} contains segment ids {unknown[:10]} that are not in the segments_info of "
                f"{ann['file_name']} in {self.panoptic_json}; the PNG and the JSON do not belong together"
            )
        return ids, segments

    def __getitem__(self, index: int) -> dict:
        info, ann = self.items[index]
        image = load_image(self.image_dir / info["file_name"])
        ids, segments = self.read_panoptic(index)
        if ids.shape != image.shape[:2]:
            raise DatasetError(
                f"size mismatch: image {self.image_dir / info['file_name']} is {image.shape[:2]} but its panoptic PNG "
                f"{self.panoptic_dir / ann['file_name']} is {ids.shape}"
            )
        # Segments listed in the JSON but absent from the PNG have empty masks; they are dropped.
        masks = [ids == s["id"] for s in segments]
        keep = [i for i, m in enumerate(masks) if m.any()]
        h, w = ids.shape
        item = {
            "image": torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1),
            "masks": torch.from_numpy(np.stack([masks[i] for i in keep]))
            if keep
            else torch.zeros(0, h, w, dtype=torch.bool),
            "labels": torch.tensor(
                [self.cat_to_contiguous[segments[i]["category_id"]] for i in keep], dtype=torch.long
            ),
            "isthing": torch.tensor(
                [self.isthing[self.cat_to_contiguous[segments[i]["category_id"]]] for i in keep],
                dtype=torch.bool,
            ),
            "iscrowd": torch.tensor([bool(segments[i].get("iscrowd", 0)) for i in keep], dtype=torch.bool),
            "captions": self._captions(
                info, [self.cat_to_contiguous[segments[i]["category_id"]] for i in keep]
            ),
            "image_id": info["id"],
            "file_name": info["file_name"],
            "height": h,
            "width": w,
        }
        return self.transform(item) if self.transform is not None else item
