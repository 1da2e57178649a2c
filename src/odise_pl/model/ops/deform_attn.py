"""Multi-scale deformable attention: the entry points and which implementation runs.

Two implementations with the same numerics (bilinear sampling, zero padding, ``align_corners=False``):
``gather`` (:mod:`.deform_attn_cpu`, ours, CPU) and ``grid_sample`` (:mod:`.deform_attn_reference`).
``auto`` picks ``gather`` on CPU and ``grid_sample`` elsewhere. Both equal a per-point loop
(``tests/test_pixel_decoder.py``), values and gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from odise_pl.model.ops.deform_attn_cpu import ms_deform_attn_gather
from odise_pl.model.ops.deform_attn_reference import ms_deform_attn_grid_sample

Impl = Literal["auto", "gather", "grid_sample"]
IMPLS = ("auto", "gather", "grid_sample")


def check_impl(impl: str) -> str:
    """``impl`` if it names an implementation, else a ValueError naming the choices."""
    if impl not in IMPLS:
        raise ValueError(f"unknown deformable-attention impl {impl!r}: use gather, grid_sample or auto")
    return impl


# DIVERGES(deform-gather): on CPU one weighted gather (deform_attn_cpu.py), grid_sample on GPU; equal to rounding
def ms_deform_attn(
    value: Tensor,
    shapes: list[tuple[int, int]],
    locations: Tensor,
    weights: Tensor,
    impl: Impl = "auto",
) -> Tensor:
    """value: (B, S, M, Dh) with S = sum(h_l * w_l); locations: (B, Lq, M, L, P, 2) in [0, 1] (x, y);
    weights: (B, Lq, M, L, P) -> (B, Lq, M * Dh).
    """
    if _resolve(impl, value) == "gather":
        pix = locations * _sizes_xy(shapes, locations)[:, None, :] - 0.5
        return ms_deform_attn_gather(value, shapes, pix, weights)
    return ms_deform_attn_grid_sample(value, shapes, locations, weights)


def ms_deform_attn_from_offsets(
    value: Tensor,
    shapes: list[tuple[int, int]],
    reference_points: Tensor,
    offsets: Tensor,
    weights: Tensor,
    impl: Impl = "auto",
) -> Tensor:
    """:func:`ms_deform_attn` at Deformable DETR's locations ``reference_points + offsets / (w_l, h_l)``,
    given in parts: reference_points (B, Lq, L, 2) in [0, 1], offsets (B, Lq, M, L, P, 2) in pixels
    of each level.

    The ``gather`` implementation works in pixel coordinates, ``reference * (w, h) - 0.5 + offsets``:
    one addition over the offsets instead of a division, an addition and a multiplication, forward
    and backward, in each encoder layer.
    """
    sizes = _sizes_xy(shapes, offsets)  # (L, 2)
    if _resolve(impl, value) == "gather":
        base = reference_points * sizes - 0.5  # (B, Lq, L, 2): small
        return ms_deform_attn_gather(value, shapes, base[:, :, None, :, None, :] + offsets, weights)
    locations = reference_points[:, :, None, :, None, :] + offsets / sizes[:, None, :]
    return ms_deform_attn_grid_sample(value, shapes, locations, weights)


def _sizes_xy(shapes: list[tuple[int, int]], like: Tensor) -> Tensor:
    """(L, 2) level sizes as (w, h), the order of (x, y)."""
    return torch.tensor([[w, h] for h, w in shapes], dtype=like.dtype, device=like.device)


def _resolve(impl: str, value: Tensor) -> str:
    """``impl`` with ``auto`` resolved for ``value``'s device; refuses ``gather`` off the CPU."""
    if check_impl(impl) == "auto":
        impl = "gather" if value.device.type == "cpu" else "grid_sample"
    if impl == "gather" and value.device.type != "cpu":
        # Its backward relies on CPU semantics of sparse kernels (unsorted, repeated columns in
        # sampled_addmm) that have not been checked on other devices.
        raise ValueError(
            f"deformable attention impl 'gather' is tested on CPU only, got a {value.device.type} "
            "tensor: use model.net.pixel_decoder.deform_attn_impl=auto or grid_sample"
        )
    return impl
