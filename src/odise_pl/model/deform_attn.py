"""Multi-scale deformable attention core (Deformable DETR, Eq. 2-3), two implementations with the
same numerics (bilinear sampling, zero padding, ``align_corners=False``):

- ``gather``: the attention weights and the 4 bilinear corner weights of every sampling point are
  folded into one weight per (query, head, corner), and the output is one weighted gather of value
  rows (``embedding_bag``). Nothing of size (B, heads, Dh, Lq, points) is materialised, as
  ``grid_sample`` does before the weighted sum; the backward pass is a sampled dense-dense product
  for the weights and a sort + weighted gather for the values. Written by hand because no library
  has a CPU kernel for this (Mask2Former ships a CUDA-only extension); on 2 CPU cores one encoder
  layer's forward + backward is 2.5x (fp32) / 3.6x (bf16) faster than the ``grid_sample`` form
  (``benchmarks/RESULTS.md``).
- ``grid_sample``: one ``F.grid_sample`` per level and a weighted sum (the reference
  ``ms_deform_attn_core_pytorch`` of Deformable DETR). Used on CUDA, where ``grid_sample`` is fused
  and the sparse kernels the ``gather`` backward relies on have not been checked.

Both equal a per-point loop (``tests/test_pixel_decoder.py``), values and gradients.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Impl = Literal["auto", "gather", "grid_sample"]
IMPLS = ("auto", "gather", "grid_sample")


def check_impl(impl: str) -> str:
    """``impl`` if it names an implementation, else a ValueError naming the choices."""
    if impl not in IMPLS:
        raise ValueError(f"unknown deformable-attention impl {impl!r}: use gather, grid_sample or auto")
    return impl


def ms_deform_attn(
    value: Tensor,
    shapes: list[tuple[int, int]],
    locations: Tensor,
    weights: Tensor,
    impl: Impl = "auto",
) -> Tensor:
    """value: (B, S, M, Dh) with S = sum(h_l * w_l); locations: (B, Lq, M, L, P, 2) in [0, 1] (x, y);
    weights: (B, Lq, M, L, P) -> (B, Lq, M * Dh).

    ``impl``: ``gather`` | ``grid_sample`` | ``auto`` (``gather`` on CPU, ``grid_sample`` elsewhere).
    """
    if _resolve(impl, value) == "gather":
        pix = locations * _sizes_xy(shapes, locations)[:, None, :] - 0.5
        return _ms_deform_attn_gather(value, shapes, pix, weights)
    return _ms_deform_attn_grid_sample(value, shapes, locations, weights)


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
        return _ms_deform_attn_gather(value, shapes, base[:, :, None, :, None, :] + offsets, weights)
    locations = reference_points[:, :, None, :, None, :] + offsets / sizes[:, None, :]
    return _ms_deform_attn_grid_sample(value, shapes, locations, weights)


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
            "tensor: use pixel_decoder.deform_attn_impl=auto or grid_sample"
        )
    return impl


def _ms_deform_attn_grid_sample(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    b, _, m, dh = value.shape
    _, lq, _, n_levels, n_points, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    attn = weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels, n_points)
    out = None
    # Weighted sum level by level: no (B*M, Dh, Lq, L*P) stack of all samples (a copy as large as
    # the samples themselves, forward and backward), a third of the peak temporary memory.
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(b * m, dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*M, Lq, P, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        part = (sampled * attn[..., lvl, :]).sum(-1)  # (B*M, Dh, Lq)
        out = part if out is None else out + part
    return out.view(b, m * dh, lq).transpose(1, 2)


_PAD = 2  # zero border around every level of the value table (see _ms_deform_attn_gather)
_INT32_LIMIT = 2**31  # index sizes from which the gather uses int64 (a module constant for tests)


def _ms_deform_attn_gather(
    value: Tensor, shapes: list[tuple[int, int]], pix: Tensor, weights: Tensor
) -> Tensor:
    """``pix``: (B, Lq, M, L, P, 2) sampling locations in pixel coordinates of each level
    (align_corners=False: pixel centres at k + 0.5, so location * size - 0.5).
    """
    b, _, m, dh = value.shape
    _, lq, _, n_levels, n_points, _ = pix.shape
    dev = value.device
    # Value table with a zero border of 2 around each level: a sampling point's 4 corners are then
    # always rows of the table (corners outside the map land on zeros, which is grid_sample's zero
    # padding), at fixed offsets (0, 1, W', W' + 1) from its top-left corner, so no masks and no
    # per-corner index arithmetic; a top-left corner is clamped to [-2, size], where both
    # neighbours along that axis are border zeros.
    padded_shapes = [(h + 2 * _PAD, w + 2 * _PAD) for h, w in shapes]
    levels = value.split([h * w for h, w in shapes], 1)
    table = torch.cat(
        [
            F.pad(v.transpose(1, 2).reshape(b * m, h, w, dh), (0, 0, _PAD, _PAD, _PAD, _PAD)).flatten(1, 2)
            for v, (h, w) in zip(levels, shapes)
        ],
        1,
    )  # (B*M, S', Dh), S' = sum of padded level sizes; row (b, m, padded position)
    padded_sizes = [hp * wp for hp, wp in padded_shapes]
    sizes = _sizes_xy(shapes, pix)
    # The top-left corner and the fraction; the floor carries no gradient, as in grid_sample.
    corner = pix.detach().floor()
    frac = pix - corner
    # int32 row indices (half the memory traffic of int64 in the index arithmetic, the gathers and
    # the backward's sort) unless the table rows or the backward's sparse entries reach 2^31.
    entries = b * lq * m * n_levels * n_points * 4
    idx = torch.int32 if max(b * m * sum(padded_sizes), entries) < _INT32_LIMIT else torch.int64
    corner = torch.minimum(corner.clamp(min=-_PAD), sizes[:, None, :]).to(idx) + _PAD
    padded_w = torch.tensor([wp for _, wp in padded_shapes], device=dev, dtype=idx)[:, None]  # (L, 1)
    level_start = torch.tensor([0, *padded_sizes[:-1]], device=dev, dtype=idx).cumsum(0).to(idx)[:, None]
    block = torch.arange(b * m, device=dev, dtype=idx).view(b, 1, m, 1, 1) * sum(padded_sizes)
    top_left = corner[..., 1] * padded_w + corner[..., 0] + level_start + block  # (B, Lq, M, L, P)
    out = _CornerGather.apply(
        table.reshape(-1, dh),
        top_left.reshape(b * lq * m, n_levels * n_points),
        frac.reshape(b * lq * m, n_levels * n_points, 2),
        weights.reshape(b * lq * m, n_levels * n_points),
        padded_shapes,
        n_points,
    )
    return out.view(b, lq, m * dh)


class _CornerGather(torch.autograd.Function):
    """``out[n] = sum_{k, c} w_c(frac[n, k]) * attn[n, k] * table[top_left[n, k] + offset_c]``: the
    bilinear sample of sampling point k, weighted by its attention, summed over points.

    Corners c = (y0, x0), (y0, x1), (y1, x0), (y1, x1) at row offsets (0, 1, W', W' + 1) (W' the
    padded width of the point's level), bilinear weights w_c from the fraction (fx, fy).
    table (R, D), rows grouped in blocks of padded levels; top_left (N, K) int32 / int64; frac (N, K, 2);
    attn (N, K) -> (N, D). The corner weights' gradients are written out by hand: three times
    fewer passes over (N, K, 4) tensors than autograd through the products.
    """

    @staticmethod
    def forward(ctx, table, top_left, frac, attn, padded_shapes, n_points):
        fx, fy = frac[..., 0], frac[..., 1]
        a1 = attn * fy  # attention times the y weights
        a0 = attn - a1
        w01, w11 = a0 * fx, a1 * fx
        weights = torch.stack((a0 - w01, w01, a1 - w11, w11), -1).to(table.dtype)  # (N, K, 4)
        rows = top_left[..., None] + _corner_offsets(padded_shapes, n_points, top_left.device, top_left.dtype)
        n = top_left.shape[0]
        ctx.save_for_backward(table, top_left, frac, attn, weights)
        ctx.padded_shapes, ctx.n_points = padded_shapes, n_points
        return F.embedding_bag(rows.view(n, -1), table, per_sample_weights=weights.view(n, -1), mode="sum")

    @staticmethod
    def backward(ctx, grad):
        table, top_left, frac, attn, weights = ctx.saved_tensors
        grad = grad.contiguous()
        n, k = top_left.shape
        g_table = g_frac = g_attn = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # d out[n] / d weight of entry (k, c) = table[row]: one dot product per entry, a
            # sampled dense-dense product on the pattern of a CSR matrix with the entries as nonzeros.
            # The rows are recomputed (one add) rather than saved: 16 bytes per sampling point and layer.
            rows = top_left[..., None] + _corner_offsets(
                ctx.padded_shapes, ctx.n_points, top_left.device, top_left.dtype
            )
            dt = torch.float32 if table.dtype in (torch.bfloat16, torch.float16) else table.dtype
            crow = torch.arange(0, n * k * 4 + 1, k * 4, device=grad.device, dtype=rows.dtype)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": we test what we use
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(
                    crow,
                    rows.view(-1),
                    # zeros, not empty: sampled_addmm computes beta * values + ..., and 0 * NaN
                    # from uninitialised memory is NaN.
                    torch.zeros(n * k * 4, dtype=dt, device=grad.device),
                    (n, table.shape[0]),
                    check_invariants=False,  # unsorted, repeated columns: fine for sampled_addmm
                )
            gw = torch.sparse.sampled_addmm(pattern, grad.to(dt), table.to(dt).t(), beta=0.0)
            gw = gw.values().view(n, k, 4).to(attn.dtype)
            g00, g01, g10, g11 = gw.unbind(-1)
            fx, fy = frac[..., 0], frac[..., 1]
            dx0, dx1 = g01 - g00, g11 - g10  # d/dfx of the y0 and y1 rows
            r0, r1 = g00 + fx * dx0, g10 + fx * dx1  # rows interpolated along x
            dy = r1 - r0
            g_attn = r0 + fy * dy
            g_frac = torch.stack(((dx0 + fy * (dx1 - dx0)) * attn, dy * attn), -1)
        if ctx.needs_input_grad[0]:
            # Transpose of the gather. Sort the points by top-left row once; each corner's
            # contribution is then a gather of output gradients per table row (offsets from the
            # sorted order), shifted by that corner's offset, level by level.
            flat = top_left.reshape(-1)
            _, order = flat.sort()
            counts = torch.bincount(flat, minlength=table.shape[0])
            offsets = torch.cumsum(counts, 0) - counts
            bag = torch.div(order, k, rounding_mode="floor")
            g = grad.to(table.dtype)
            w_sorted = weights.reshape(-1, 4)[order]
            blocks = table.shape[0] // sum(h * w for h, w in ctx.padded_shapes)
            parts = [
                F.embedding_bag(
                    bag, g, offsets, per_sample_weights=w_sorted[:, c].contiguous(), mode="sum"
                ).view(blocks, -1, table.shape[1])
                for c in range(4)
            ]
            g_table = parts[0].clone()
            start = 0
            for hp, wp in ctx.padded_shapes:
                size = hp * wp
                for c, off in ((1, 1), (2, wp), (3, wp + 1)):
                    # No point's top-left corner lies in the last W' + 1 rows of a level (clamp),
                    # so the shift stays inside the level.
                    g_table[:, start + off : start + size] += parts[c][:, start : start + size - off]
                start += size
            g_table = g_table.view_as(table)
        return g_table, None, g_frac, g_attn, None, None


def _corner_offsets(padded_shapes: list[tuple[int, int]], n_points: int, device, dtype) -> Tensor:
    """(L*P, 4) row offsets of the 4 corners from the top-left one, per sampling point."""
    offs = torch.tensor([[0, 1, wp, wp + 1] for _, wp in padded_shapes], device=device, dtype=dtype)
    return offs.repeat_interleave(n_points, 0)
