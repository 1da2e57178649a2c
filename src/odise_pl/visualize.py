"""Drawing panoptic results: segment colours blended over the image, each labelled with its category."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def colours(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 distinct-ish RGB colours, the same for the same ``n`` and ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 255, (n, 3)).astype(np.uint8)


def overlay(image: np.ndarray, ids: np.ndarray, segments: list[dict], names: list[str]) -> Image.Image:
    """``image`` (H, W, 3) uint8, ``ids`` (H, W) segment ids, ``segments`` with ``id`` and
    ``category_id`` (an index into ``names``) -> the image with each segment tinted and its category
    name written at its centre.
    """
    out = image.astype(np.float32).copy()
    pal = colours(len(segments) + 1)
    for k, s in enumerate(segments):
        m = ids == s["id"]
        out[m] = 0.45 * out[m] + 0.55 * pal[k]
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for s in segments:
        ys, xs = np.nonzero(ids == s["id"])
        if len(ys):
            text = names[s["category_id"]]
            x, y = int(xs.mean()), int(ys.mean())
            draw.text((x + 1, y + 1), text, fill=(0, 0, 0))
            draw.text((x, y), text, fill=(255, 255, 255))
    return im
