"""The official sliding window: a backbone with a fixed input size over images of any size.

PARITY with the official ``FeatureExtractorBackbone.slide_forward`` (slide training and inference,
as the released models run): square windows of side ``min(backbone_size, short side)`` at a stride of
one window, the last window of a row / column aligned to the border; each window is resized to the
backbone's size, run through backbone *and pyramid* at the window's own size, and the pyramid outputs
are summed into the full map and divided by the per-position window count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def window_boxes(height: int, width: int, window: int) -> list[tuple[int, int, int, int]]:
    """``[(y1, y2, x1, x2)]`` (end exclusive), rows outer, columns inner, as the official loop visits them."""
    rows = max(height - window + window - 1, 0) // window + 1
    cols = max(width - window + window - 1, 0) // window + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * window + window, height), min(j * window + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def slide(
    images: Tensor,
    backbone_size: int,
    run: Callable[[Tensor, tuple[int, int]], dict[str, Tensor]],
    strides: dict[str, int],
    windows_per_pass: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``images: (B, 3, H, W)`` -> (averaged pyramid ``{name: (B, C, H / s, W / s)}``, window counts
    ``{name: (H / s, W / s)}``).

    ``run(windows, window_size)``: ``windows (N * B, 3, S, S)`` (window-major: the B crops of one
    window, then the next), ``window_size`` the crops' size before resizing to S = ``backbone_size``
    -> ``{name: (N * B, C, window / s, window / s)}``. ``windows_per_pass`` bounds N (memory); by
    default every window of the batch goes through the backbone together, which computes the same
    as one at a time (every layer acts per sample).
    """
    b, _, h, w = images.shape
    side = min(backbone_size, h, w)
    boxes = window_boxes(h, w, side)
    step = windows_per_pass or len(boxes)
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    for start in range(0, len(boxes), step):
        chunk = boxes[start : start + step]
        crops = torch.cat([images[..., y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        if side != backbone_size:
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms import functional as TF

            # PARITY: the official T.Resize((S, S), bicubic) of the window (antialias as torchvision
            # >= 0.17 does by default; see FrozenCLIP's `antialias`).
            crops = TF.resize(
                crops, [backbone_size, backbone_size], InterpolationMode.BICUBIC, antialias=True
            )
        outs = run(crops, (side, side))
        if len(boxes) == 1:  # one window covering the image: nothing to add up (x / 1 is exact)
            return outs, {n: torch.ones(h // strides[n], w // strides[n], dtype=torch.long) for n in outs}
        for name, feats in outs.items():
            s = strides[name]
            if name not in sums:
                sums[name] = feats.new_zeros(b, feats.shape[1], h // s, w // s)
                counts[name] = torch.zeros(h // s, w // s, dtype=torch.long, device=feats.device)
            for n, (y1, y2, x1, x2) in enumerate(chunk):
                sums[name][..., y1 // s : y2 // s, x1 // s : x2 // s] += feats[n * b : (n + 1) * b]
                counts[name][y1 // s : y2 // s, x1 // s : x2 // s] += 1
    return {name: sums[name] / counts[name].to(sums[name].dtype) for name in sums}, counts
