"""A small deterministic dataset written in exactly the COCO panoptic layout.

``python -m odise_pl.data.synthetic --out DIR`` writes::

    DIR/train2017/000000000001.jpg ...            images
    DIR/val2017/...
    DIR/annotations/panoptic_train2017.json        COCO panoptic JSON (images, annotations, categories)
    DIR/annotations/panoptic_train2017/*.png       id = R + 256 G + 256^2 B, 0 = VOID
    DIR/annotations/captions_train2017.json        COCO captions JSON
    (and the same for val)

Scenes: stuff (sky above grass or water, each a texture) and 1-4 things (circles, squares,
triangles in several colours) that may occlude each other; some images have an ``iscrowd``
cluster of small circles and a VOID patch. Each image has two captions naming its objects, so
both label and caption supervision can be trained on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from odise_pl.data.io import ids_to_rgb
from odise_pl.errors import DatasetError
from odise_pl.log_setup import configure_cli, get_logger

log = get_logger(__name__)

THINGS = [(1, "circle"), (2, "square"), (3, "triangle")]
# Non-contiguous stuff ids, as in COCO, so the reader's contiguous mapping is exercised.
STUFF = [(100, "sky"), (101, "grass"), (102, "water")]
COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SIZES = [(128, 160), (160, 128), (144, 144), (128, 192)]


def categories() -> list[dict]:
    """COCO panoptic ``categories`` entries."""
    cats = [
        {"id": i, "name": n, "supercategory": "shape", "isthing": 1, "color": [200, 50 * i, 40]}
        for i, n in THINGS
    ]
    cats += [
        {"id": i, "name": n, "supercategory": "scene", "isthing": 0, "color": [40, 60 * (i - 99), 200]}
        for i, n in STUFF
    ]
    return cats


def _texture(rng: np.random.Generator, name: str, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = rng.normal(0, 8, (h, w, 1))
    if name == "sky":
        base = np.stack([110 + 60 * yy / h, 160 + 50 * yy / h, 240 + 0 * yy], -1)
    elif name == "grass":
        stripes = 18 * np.sin(xx * 0.9 + rng.uniform(0, 6)) * np.sin(yy * 0.35)
        base = np.stack([60 + 0 * yy, 150 + stripes, 50 + 0 * yy], -1)
    else:  # water
        waves = 25 * np.sin(yy * 0.6 + 0.15 * xx + rng.uniform(0, 6))
        base = np.stack([30 + 0 * yy, 110 + waves, 170 + waves], -1)
    return np.clip(base + noise, 0, 255)


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, r: float, angle: float = 0.0) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        pts = [
            (cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3))
            for k in range(3)
        ]
        draw.polygon(pts, fill=1)
    return np.asarray(img, dtype=bool)


def make_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict], list[str]]:
    """One image: (H, W, 3) uint8 pixels, (H, W) int segment ids (0 = VOID), segments_info, captions."""
    h, w = SIZES[rng.integers(len(SIZES))]
    seg = np.zeros((h, w), dtype=np.int64)
    pixels = np.zeros((h, w, 3), dtype=np.float64)
    segments: list[dict] = []
    used: set[int] = set()

    def add(mask: np.ndarray, cat: int, crowd: int = 0) -> int:
        # Arbitrary unique ids spanning all three PNG channels, as real COCO ids do.
        sid = int(rng.integers(1, 256**3))
        while sid in used:
            sid = int(rng.integers(1, 256**3))
        used.add(sid)
        seg[mask] = sid
        segments.append({"id": sid, "category_id": cat, "iscrowd": crowd})
        return sid

    horizon = int(h * rng.uniform(0.3, 0.55))
    ground = "grass" if rng.random() < 0.5 else "water"
    sky_mask = np.zeros((h, w), bool)
    sky_mask[:horizon] = True
    add(sky_mask, 100)
    pixels[sky_mask] = _texture(rng, "sky", h, w)[sky_mask]
    add(~sky_mask, 101 if ground == "grass" else 102)
    pixels[~sky_mask] = _texture(rng, ground, h, w)[~sky_mask]

    named: list[str] = []
    for _ in range(int(rng.integers(1, 5))):
        cat, kind = THINGS[rng.integers(len(THINGS))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        r = rng.uniform(10, 26)
        mask = _shape_mask(
            kind, h, w, rng.uniform(r, w - r), rng.uniform(r, h - r), r, rng.uniform(0, 2 * np.pi)
        )
        add(mask, cat)
        shade = np.asarray(COLOURS[colour], np.float64) * rng.uniform(0.85, 1.0)
        pixels[mask] = shade + rng.normal(0, 4, (int(mask.sum()), 3))
        named.append(f"{colour} {kind}")

    if rng.random() < 0.25:  # a crowd: a cluster of small circles annotated as one region
        cx, cy = rng.uniform(20, w - 20), rng.uniform(horizon, h - 12)
        crowd = np.zeros((h, w), bool)
        for _ in range(6):
            crowd |= _shape_mask("circle", h, w, cx + rng.uniform(-14, 14), cy + rng.uniform(-8, 8), 4)
        add(crowd, 1, crowd=1)
        pixels[crowd] = COLOURS["white"]
        named.append("group of small circles")
    if rng.random() < 0.3:  # an unlabeled (VOID) patch, as real annotations have
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        seg[y0 : y0 + 6, x0 : x0 + 6] = 0
        pixels[y0 : y0 + 6, x0 : x0 + 6] = (0, 0, 0)

    present = {int(i) for i in np.unique(seg)} - {0}
    info = []
    for s in segments:
        if s["id"] not in present:  # fully occluded
            continue
        ys, xs = np.nonzero(seg == s["id"])
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        info.append({**s, "area": int(len(ys)), "bbox": bbox})
    objects = ", ".join(named[:-1]) + (" and " if len(named) > 1 else "") + named[-1]
    captions = [f"a {objects} on the {ground} under the sky.", f"a picture of {objects} near some {ground}."]
    return np.clip(pixels, 0, 255).astype(np.uint8), seg, info, captions


def write_split(
    out: Path, split: str, num_images: int, seed: int, start_id: int = 1
) -> dict[int, np.ndarray]:
    """Write one split; returns image_id -> (H, W) segment-id map (what the PNGs encode)."""
    rng = np.random.default_rng(seed)
    img_dir = out / f"{split}2017"
    png_dir = out / "annotations" / f"panoptic_{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, captions, maps = [], [], [], {}
    cap_id = 1
    for k in range(num_images):
        image_id = start_id + k
        pixels, seg, info, caps = make_scene(rng)
        name = f"{image_id:012d}"
        Image.fromarray(pixels).save(img_dir / f"{name}.jpg", quality=95)
        Image.fromarray(ids_to_rgb(seg)).save(png_dir / f"{name}.png")
        h, w = seg.shape
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": info})
        for c in caps:
            captions.append({"image_id": image_id, "id": cap_id, "caption": c})
            cap_id += 1
        maps[image_id] = seg
    meta = {
        "info": {"description": "odise-pl synthetic COCO-panoptic-format dataset", "seed": seed},
        "licenses": [],
    }
    with open(out / "annotations" / f"panoptic_{split}2017.json", "w") as f:
        json.dump({**meta, "images": images, "annotations": annotations, "categories": categories()}, f)
    with open(out / "annotations" / f"captions_{split}2017.json", "w") as f:
        json.dump({**meta, "images": images, "annotations": captions}, f)
    # An example user caption file (image file name -> caption), as a captioner such as BLIP
    # would produce; used by the `file` captioner ablation. Both splits share one file.
    gen = out / "annotations" / "generated_captions.json"
    existing = json.loads(gen.read_text()) if gen.is_file() else {}
    existing.update({im["file_name"]: c["caption"] for im, c in zip(images, captions[1::2])})
    with open(gen, "w") as f:
        json.dump(existing, f)
    return maps


def write_dataset(out: str | Path, num_train: int = 64, num_val: int = 16, seed: int = 0) -> dict[str, dict]:
    """Write train and val splits under ``out``; returns split -> image_id -> segment-id map."""
    out = Path(out)
    return {
        "train": write_split(out, "train", num_train, seed),
        "val": write_split(out, "val", num_val, seed + 1, start_id=100000),
    }


def ensure_dataset(root: str | Path, num_train: int = 64, num_val: int = 16, seed: int = 0) -> Path:
    """Write the dataset to ``root`` unless it is there, safely against concurrent first runs.

    It is written to a private temporary folder beside ``root`` and renamed into place in one step,
    so ``root`` is either absent or complete: two runs starting together may both write it, the
    first rename wins and the other run uses that copy.
    """
    root = Path(root)
    if (root / "annotations").is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        write_dataset(tmp, num_train, num_val, seed)
        try:
            os.rename(tmp, root)  # replaces an empty folder, fails on a non-empty one
        except OSError:
            if not (root / "annotations").is_dir():
                raise DatasetError(
                    f"cannot write the synthetic dataset to {root}: the folder exists and is not one; "
                    "empty it or point data.synthetic.root (paths.synthetic) elsewhere"
                ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m odise_pl.data.synthetic --out DIR [--num-train N --num-val N --seed S]``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (COCO layout is created inside)")
    p.add_argument("--num-train", type=int, default=64)
    p.add_argument("--num-val", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    configure_cli()
    write_dataset(args.out, args.num_train, args.num_val, args.seed)
    log.info(
        "wrote %d train + %d val images in COCO panoptic format to %s", args.num_train, args.num_val, args.out
    )


if __name__ == "__main__":
    main()
