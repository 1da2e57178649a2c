"""Frozen features for inspection: k-means clustering of diffusion vs. CLIP features (Fig. 1, supplement)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.cluster.vq import kmeans2
from torch import Tensor

from odise_pl.model.odise import ODISE


@torch.no_grad()
def diffusion_features(
    net: ODISE,
    image: Tensor,
    names: list[str] | None = None,
    timestep: int | None = None,
    captions: list[str] | None = None,
) -> dict[str, Tensor]:
    """Image (3, H, W) in [0, 1], H and W multiples of 64 -> {tap name: (C, h, w)} from one UNet pass.

    ``timestep`` overrides the backbone's steps for this call; the captioner is the model's.
    """
    backbone = net.backbone
    saved = backbone.timesteps
    if timestep is not None:
        backbone.timesteps = (int(timestep),)
    try:
        cond, offset = net.captioner(image[None], captions)
        feats = backbone(image[None], cond, offset)
    finally:
        backbone.timesteps = saved
    return {k: v[0] for k, v in feats.items() if names is None or k in names}


@torch.no_grad()
def clip_features(net: ODISE, image: Tensor) -> Tensor:
    """Image (3, H, W) in [0, 1] -> (D, g, g) CLIP dense features."""
    return net.clip.dense_features(image[None])[0]


def kmeans_labels(
    features: Tensor, k: int = 6, seed: int = 0, size: tuple[int, int] | None = None
) -> np.ndarray:
    """(C, h, w) features -> (h, w) cluster ids (k-means++ on L2-normalised features, scipy),
    optionally after resizing the features to ``size``.
    """
    if size is not None:
        features = F.interpolate(features[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    c, h, w = features.shape
    x = F.normalize(features.float().reshape(c, -1).T, dim=1).double().numpy()
    _, labels = kmeans2(x, k, minit="++", seed=seed)
    return labels.reshape(h, w)


def colorize(labels: np.ndarray, size: tuple[int, int] | None = None, seed: int = 0) -> Image.Image:
    """(h, w) ids -> RGB image (nearest-resized to ``size`` = (W, H))."""
    pal = np.random.default_rng(seed).integers(30, 255, (int(labels.max()) + 1, 3)).astype(np.uint8)
    im = Image.fromarray(pal[labels])
    return im.resize(size, Image.NEAREST) if size else im


def side_by_side(images: list[Image.Image], height: int = 256) -> Image.Image:
    """Concatenate images horizontally at a common height."""
    scaled = [im.resize((round(im.width * height / im.height), height), Image.NEAREST) for im in images]
    out = Image.new("RGB", (sum(im.width for im in scaled), height))
    x = 0
    for im in scaled:
        out.paste(im, (x, 0))
        x += im.width
    return out
