"""Segmenting a whole folder through Lightning's predict loop: batched, with data-loader workers, on
every device of a ``trainer=`` choice (each image done once), resumable.

Per image ``REL`` (its path relative to the input folder, without suffix), in the output folder:

- ``panoptic/REL.png``: segment ids as R + 256 G + 256^2 B (COCO panoptic PNG);
- ``segments/REL.json``: its COCO panoptic annotation (``image_id``, ``file_name``, ``segments_info``
  with the vocabulary's category ids and scores), written last and atomically: it marks the image
  done, so a rerun skips it and an interrupted run never leaves half an image behind;
- optionally ``semantic/REL.png`` (uint16 category ids; 65535 where no category scores) and
  ``overlay/REL.png`` (labelled segments over the image).

An unreadable image is logged and recorded in ``errors/REL.txt`` (retried by a rerun), never the end
of the job. :func:`write_predictions_json` then gathers ``predictions.json`` in the COCO panoptic
results format (``annotations`` + ``categories``), which ``python -m odise_pl.evaluation.panoptic_quality
--pred-json OUT/predictions.json --pred-folder OUT/panoptic`` scores as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from odise_pl.data.io import ids_to_rgb, load_image
from odise_pl.data.transforms import ResizeShortestEdge, pad_to_divisible
from odise_pl.data.vocab import Vocabulary
from odise_pl.errors import OdiseError
from odise_pl.fs import atomic_write
from odise_pl.log_setup import get_logger
from odise_pl.visualize import overlay

log = get_logger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
NO_CATEGORY = 65535


def find_images(source: str) -> tuple[Path, list[Path]]:
    """(the folder names are relative to, the images) of ``source``: a folder (searched recursively),
    a glob pattern, or a text file listing one image path per line (relative to the file's folder or
    absolute). Sorted, duplicates removed; nothing found is an :class:`OdiseError`.
    """
    import glob
    import os

    path = Path(source)
    if path.is_dir():
        base = path
        found = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
        base = path.parent
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
        found = [
            Path(ln) if Path(ln).is_absolute() else base / ln for ln in lines if ln and not ln.startswith("#")
        ]
    else:
        found = [
            Path(p) for p in glob.glob(source, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES
        ]
        base = Path(os.path.commonpath([str(p.resolve().parent) for p in found])) if found else Path(".")
    found = sorted(dict.fromkeys(found))
    if not found:
        raise OdiseError(
            f"no images found for input={source} (a folder, a glob such as 'photos/*.jpg', or a text file "
            f"listing image paths; suffixes {', '.join(IMAGE_SUFFIXES)})"
        )
    return base, found


def relative_stem(path: Path, base: Path) -> str:
    """``path`` relative to ``base``, without suffix, '/'-separated (its name in every output folder)."""
    try:
        rel = path.resolve().relative_to(base.resolve())
    except ValueError:  # a list file may name images elsewhere: keep the name only
        rel = Path(path.name)
    return rel.with_suffix("").as_posix()


class FolderDataset(torch.utils.data.Dataset):
    """``items`` (path, relative stem) -> ``{image (3, h, w) uint8, meta}``; an unreadable image is
    ``{error}`` (the predict step records it and goes on).
    """

    def __init__(self, items: list[tuple[Path, str]], transform: ResizeShortestEdge):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, stem = self.items[i]
        try:
            image = load_image(path)
        except OdiseError as err:
            return {"path": str(path), "stem": stem, "error": str(err)}
        h, w = image.shape[:2]
        item = self.transform({"image": torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)})
        return {"path": str(path), "stem": stem, "image": item["image"], "height": h, "width": w}


def collate_images(items: list[dict], size_divisibility: int) -> dict:
    """Readable items -> ``images`` (B, 3, H, W) uint8 padded, ``meta``, ``items``; the rest -> ``failed``."""
    good = [it for it in items if "error" not in it]
    batch = {"failed": [it for it in items if "error" in it], "items": good}
    if good:
        batch["images"], sizes = pad_to_divisible([it["image"] for it in good], size_divisibility)
        batch["meta"] = [
            {"input_size": s, "height": it["height"], "width": it["width"]} for s, it in zip(sizes, good)
        ]
    return batch


class FolderDataModule(L.LightningDataModule):
    """The images of this process: rank, rank + world, ... (each image once, no padding repeats)."""

    def __init__(self, dataset: FolderDataset, batch_size: int, num_workers: int, size_divisibility: int):
        super().__init__()
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.size_divisibility = size_divisibility

    def predict_dataloader(self):
        import functools

        rank, world = self.trainer.global_rank, self.trainer.world_size
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.dataset, list(range(rank, len(self.dataset), world))),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=functools.partial(collate_images, size_divisibility=self.size_divisibility),
        )


class FolderPrediction(L.LightningModule):
    """Open-vocabulary panoptic inference over batches of a folder, each image's files written as it
    is done (see the module docstring).

    Args:
        predictor: the inference settings (its ``net`` becomes this module's, so Lightning places it).
        vocabulary: the categories (names, ids, thing / stuff).
        out: the output folder.
        image_ids: file name or relative stem -> the image id to write (a dataset's ids, so that
            the predictions score against its ground truth); default: the stem's digits when it is
            a number (COCO's names), else the stem.
        semantic, overlay: also write those images.
    """

    def __init__(
        self,
        predictor,
        vocabulary: Vocabulary,
        out: Path,
        image_ids: dict[str, int] | None = None,
        semantic: bool = False,
        overlay: bool = False,
    ):
        super().__init__()
        self.net, self.predictor = predictor.net, predictor
        self.vocabulary, self.out, self.image_ids = vocabulary, Path(out), image_ids or {}
        self.write_semantic, self.write_overlay = semantic, overlay
        self.done = self.failed = 0

    def image_id(self, path: str, stem: str):
        name = Path(path).name
        if name in self.image_ids or stem in self.image_ids:
            return self.image_ids.get(name, self.image_ids.get(stem))
        last = stem.rsplit("/", 1)[-1]
        return int(last) if last.isdigit() else stem

    def predict_step(self, batch: dict, batch_idx: int) -> int:
        for it in batch["failed"]:
            self.failed += 1
            log.warning("skipped %s: %s", it["path"], it["error"])
            target = self.out / "errors" / f"{it['stem']}.txt"
            atomic_write(target, lambda f, e=it["error"]: f.write((e + "\n").encode()))
        if not batch["items"]:
            return 0
        tasks = ("panoptic", "semantic") if self.write_semantic else ("panoptic",)
        preds = self.predictor(
            batch["images"], batch["meta"], self.vocabulary.names, self.vocabulary.isthing, tasks=tasks
        )
        for it, pred in zip(batch["items"], preds):
            self._write(it, pred)
            self.done += 1
        return len(preds)  # images written (Lightning warns about a step that returns None)

    def _write(self, it: dict, pred: dict) -> None:
        ids, segments = pred["panoptic"]
        ids = ids.cpu().numpy().astype(np.int64)
        stem, vocab = it["stem"], self.vocabulary
        png = Image.fromarray(ids_to_rgb(ids))
        atomic_write(self.out / "panoptic" / f"{stem}.png", lambda f: png.save(f, format="PNG"))
        if self.write_semantic:
            scores = pred["semantic"]
            best = scores.argmax(0).cpu().numpy()
            cat = np.asarray(vocab.ids, dtype=np.int64)[best]
            cat[(scores.max(0).values <= 0).cpu().numpy()] = NO_CATEGORY
            sem = Image.fromarray(cat.astype(np.uint16))
            atomic_write(self.out / "semantic" / f"{stem}.png", lambda f: sem.save(f, format="PNG"))
        if self.write_overlay:
            picture = overlay(load_image(it["path"]), ids, segments, vocab.display_names)
            atomic_write(self.out / "overlay" / f"{stem}.png", lambda f: picture.save(f, format="PNG"))
        record = {
            "image_id": self.image_id(it["path"], stem),
            "file_name": f"{stem}.png",
            "source": it["path"],
            "height": int(ids.shape[0]),
            "width": int(ids.shape[1]),
            "segments_info": [
                {
                    "id": int(s["id"]),
                    "category_id": int(vocab.ids[s["category_id"]]),
                    "isthing": int(s["isthing"]),
                    "score": round(float(s["score"]), 4),
                    "area": int((ids == s["id"]).sum()),
                }
                for s in segments
            ],
        }
        # last: the image counts as done once this exists
        atomic_write(self.out / "segments" / f"{stem}.json", lambda f: f.write(json.dumps(record).encode()))
        (self.out / "errors" / f"{stem}.txt").unlink(missing_ok=True)


def write_predictions_json(out: Path, stems: list[str], vocabulary: Vocabulary) -> tuple[Path, int]:
    """``OUT/predictions.json`` (COCO panoptic results) from the per-image records of ``stems``, in
    that order; returns (its path, the number of images it holds).
    """
    annotations = []
    for stem in stems:
        path = out / "segments" / f"{stem}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            record.pop("source", None)
            annotations.append(record)
    categories = [
        {"id": int(i), "name": names[0], "synonyms": names, "isthing": int(t)}
        for i, names, t in zip(vocabulary.ids, vocabulary.names, vocabulary.isthing)
    ]
    target = out / "predictions.json"
    data = {"annotations": annotations, "categories": categories}
    atomic_write(target, lambda f: f.write(json.dumps(data).encode()))
    return target, len(annotations)
