"""Augmentations on item dicts (``image: (3, H, W) uint8``, ``masks: (N, H, W) bool``)."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor


def _resize(item: dict, h: int, w: int) -> dict:
    img = F.interpolate(
        item["image"][None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True
    )
    item["image"] = img[0].round().clamp(0, 255).to(torch.uint8)
    if item["masks"].numel():
        # nearest-exact samples pixel centres like bilinear does; plain "nearest" is offset by half a
        # source pixel, so masks would drift against the image.
        item["masks"] = F.interpolate(item["masks"][None].to(torch.uint8), size=(h, w), mode="nearest-exact")[
            0
        ].bool()
    else:
        item["masks"] = torch.zeros(0, h, w, dtype=torch.bool)
    return item


def select_segments(item: dict, keep: Tensor) -> dict:
    """Keep the segments where ``keep`` (N,) is True, in every per-segment field."""
    for k in ("masks", "labels", "isthing", "iscrowd"):
        item[k] = item[k][keep]
    return item


def _drop_empty(item: dict) -> dict:
    keep = item["masks"].flatten(1).any(1) if item["masks"].numel() else torch.zeros(0, dtype=torch.bool)
    return select_segments(item, keep)


class LSJ:
    """Large-scale jittering (Ghiasi et al.), as Mask2Former / ODISE train with it.

    Random horizontal flip; resize so the image fits a square of ``size * s``, ``s ~ U(min_scale,
    max_scale)``, keeping aspect; a random ``size x size`` crop where larger; padding to ``size x
    size`` (bottom / right) with ``pad_value`` (PARITY: detectron2's ``FixedSizeCrop`` pads with 128);
    padded pixels belong to no segment. Output ``image: (3, size, size)``, ``masks: (N, size,
    size)``, ``valid: (size, size)`` bool marking non-padded pixels.

    ``keep_empty``: PARITY (Mask2Former's COCO panoptic LSJ mapper, as ODISE trains): every segment
    stays a target, also one the crop left without a pixel (it takes part in the matching and in the
    mask losses' normaliser). ``false`` drops such segments.
    """

    def __init__(
        self,
        size: int = 1024,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        flip: bool = True,
        pad_value: int = 128,
        keep_empty: bool = True,
    ):
        self.size, self.min_scale, self.max_scale, self.flip = size, min_scale, max_scale, flip
        self.pad_value, self.keep_empty = pad_value, keep_empty

    def __call__(self, item: dict) -> dict:
        if self.flip and random.random() < 0.5:
            item["image"] = item["image"].flip(-1)
            item["masks"] = item["masks"].flip(-1)
        h, w = item["image"].shape[-2:]
        scale = random.uniform(self.min_scale, self.max_scale)
        f = min(self.size * scale / h, self.size * scale / w)
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        item = _resize(item, nh, nw)
        y0 = random.randint(0, max(0, nh - self.size))
        x0 = random.randint(0, max(0, nw - self.size))
        item["image"] = item["image"][:, y0 : y0 + self.size, x0 : x0 + self.size]
        item["masks"] = item["masks"][:, y0 : y0 + self.size, x0 : x0 + self.size]
        ch, cw = item["image"].shape[-2:]
        pad = (0, self.size - cw, 0, self.size - ch)
        item["image"] = F.pad(item["image"], pad, value=self.pad_value)
        item["masks"] = F.pad(item["masks"], pad)
        valid = torch.zeros(self.size, self.size, dtype=torch.bool)
        valid[:ch, :cw] = True
        item["valid"] = valid
        # DIVERGES(lsj-keep-empty) with keep_empty=false: segments the crop emptied dropped, not the official default
        return item if self.keep_empty else _drop_empty(item)


class ResizeShortestEdge:
    """Test-time resize: shortest edge to ``short_edge``, longest at most ``max_size``.

    The ground truth keeps its original size (evaluation compares at the original resolution); the
    original ``height`` / ``width`` stay in the item for resizing predictions back.
    """

    def __init__(self, short_edge: int = 512, max_size: int = 2048):
        self.short_edge, self.max_size = short_edge, max_size

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        f = self.short_edge / min(h, w)
        if max(h, w) * f > self.max_size:
            f = self.max_size / max(h, w)
        return max(1, round(h * f)), max(1, round(w * f))

    def __call__(self, item: dict) -> dict:
        h, w = item["image"].shape[-2:]
        nh, nw = self.target_size(h, w)
        img = F.interpolate(
            item["image"][None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
        )
        item["image"] = img[0].round().clamp(0, 255).to(torch.uint8)
        return item


def pad_to_divisible(images: list[Tensor], divisor: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """List of (3, h_i, w_i) -> (B, 3, H, W) zero-padded bottom/right, H, W multiples of ``divisor``."""
    sizes = [tuple(im.shape[-2:]) for im in images]
    hh = math.ceil(max(s[0] for s in sizes) / divisor) * divisor
    ww = math.ceil(max(s[1] for s in sizes) / divisor) * divisor
    out = images[0].new_zeros(len(images), images[0].shape[0], hh, ww)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return out, sizes
