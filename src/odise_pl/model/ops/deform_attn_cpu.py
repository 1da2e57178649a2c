r"""Our CPU kernel for multi-scale deformable attention: one weighted gather, backward by hand.

Why ours: no library has a CPU kernel for this (Mask2Former ships a CUDA-only extension), and the
``grid_sample`` form (:mod:`.deform_attn_reference`) materialises every sample (B, heads, Dh, Lq,
points) before its weighted sum. Here the attention weight and the 4 bilinear corner weights of
every sampling point are folded into one weight per (query, head, corner), and the output is one
weighted gather of value rows (``embedding_bag``). On 2 CPU cores one encoder layer's forward +
backward is 2.5x (fp32) / 3.6x (bf16) faster (``benchmarks/RESULTS.md``).

**The table.** The values of every level are laid out as rows of one table ``T`` with a zero border
of width 2 around each level (padded width W'). A sampling point's 4 corners are then always rows of
``T`` (corners outside the map land on border zeros: ``grid_sample``'s zero padding) at fixed offsets
``o = (0, 1, W', W' + 1)`` from its top-left corner row ``r``, so there are no masks and no per-corner
index arithmetic; a top-left corner is clamped to [-2, size], where both neighbours along that axis
are border zeros.

**Forward.** For output row n (one query and head) and its sampling points k, with top-left row
``r_k``, fraction ``(fx_k, fy_k)`` in [0, 1) and attention ``a_k``::

    w_k = a_k * ((1-fx)(1-fy),  fx(1-fy),  (1-fx)fy,  fx fy)      corners 00, 01, 10, 11
    out[n] = sum_k sum_c w_kc * T[r_k + o_c]

**Backward.** With ``g = dL/dout[n]`` and ``s_kc = <g, T[r_k + o_c]>`` (one dot product per entry,
computed for all entries at once as a sampled dense-dense product on the CSR pattern whose nonzeros
are the entries)::

    dL/da_k  = bilinear interpolation of s_k at (fx, fy)
             = r0 + fy (r1 - r0),  r0 = s00 + fx (s01 - s00),  r1 = s10 + fx (s11 - s10)
    dL/dfx_k = a_k ((1-fy)(s01 - s00) + fy (s11 - s10))
    dL/dfy_k = a_k (r1 - r0)
    dL/dT[j] = sum over entries (n, k, c) with r_k + o_c = j of w_kc * g[n]

The fraction's gradient reaches the sampling offsets (the floor carries none, as in ``grid_sample``).
The last line is the transpose of the gather, a scatter-add with many repeated destinations. It
is computed without one: the entries are sorted once by their top-left row; then for each corner c
a segmented sum (``embedding_bag`` over the sorted entries, one bag per table row) gives
``P_c[j] = sum_{r_k = j} w_kc g[n]``, and ``dL/dT[j + o_c] += P_c[j]`` is a shift of ``P_c`` by
``o_c`` rows within each level (no top-left corner lies in a level's last W' + 1 rows, so the shift
stays inside it). One sort serves all four corners. Tested against autograd through the
``grid_sample`` form and with ``gradcheck`` in float64 (``tests/test_pixel_decoder.py``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

_PAD = 2  # zero border around every level of the value table
_INT32_LIMIT = 2**31  # index sizes from which int64 indices are used (a module constant for tests)


def ms_deform_attn_gather(
    value: Tensor, shapes: list[tuple[int, int]], pix: Tensor, weights: Tensor
) -> Tensor:
    """Value (B, S, M, Dh); ``pix``: (B, Lq, M, L, P, 2) sampling locations in pixel coordinates of
    each level (align_corners=False: pixel centres at k + 0.5, so location * size - 0.5); weights
    (B, Lq, M, L, P) -> (B, Lq, M * Dh).
    """
    b, _, m, dh = value.shape
    _, lq, _, n_levels, n_points, _ = pix.shape
    dev = value.device
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
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=pix.dtype, device=dev)  # (L, 2) as (x, y)
    corner = pix.detach().floor()  # top-left corner; no gradient through the floor
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
    """``out[n] = sum_{k, c} w_kc * T[top_left[n, k] + o_c]`` (see the module docstring).

    table (R, D), rows grouped in blocks of padded levels; top_left (N, K) int32 / int64; frac
    (N, K, 2) as (fx, fy); attn (N, K) -> (N, D).
    """

    @staticmethod
    def forward(ctx, table, top_left, frac, attn, padded_shapes, n_points):
        fx, fy = frac[..., 0], frac[..., 1]
        attn_y1 = attn * fy  # a fy: the bottom row's share
        attn_y0 = attn - attn_y1  # a (1 - fy): the top row's
        w01, w11 = attn_y0 * fx, attn_y1 * fx
        corner_w = torch.stack((attn_y0 - w01, w01, attn_y1 - w11, w11), -1).to(table.dtype)  # (N, K, 4)
        rows = top_left[..., None] + _corner_offsets(padded_shapes, n_points, top_left.device, top_left.dtype)
        n = top_left.shape[0]
        ctx.save_for_backward(table, top_left, frac, attn, corner_w)
        ctx.padded_shapes, ctx.n_points = padded_shapes, n_points
        return F.embedding_bag(rows.view(n, -1), table, per_sample_weights=corner_w.view(n, -1), mode="sum")

    @staticmethod
    def backward(ctx, grad):
        table, top_left, frac, attn, corner_w = ctx.saved_tensors
        grad = grad.contiguous()
        n, k = top_left.shape
        g_table = g_frac = g_attn = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # s[n, k, c] = <grad[n], T[row]>: a sampled dense-dense product on the CSR pattern of
            # the entries. The rows are recomputed (one add) rather than saved: 16 bytes per
            # sampling point and layer.
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
            s = torch.sparse.sampled_addmm(pattern, grad.to(dt), table.to(dt).t(), beta=0.0)
            s00, s01, s10, s11 = s.values().view(n, k, 4).to(attn.dtype).unbind(-1)
            fx, fy = frac[..., 0], frac[..., 1]
            ds_top, ds_bottom = s01 - s00, s11 - s10  # along x, in the top and bottom rows
            r0, r1 = s00 + fx * ds_top, s10 + fx * ds_bottom  # rows interpolated along x
            g_attn = r0 + fy * (r1 - r0)
            g_frac = torch.stack(((ds_top + fy * (ds_bottom - ds_top)) * attn, (r1 - r0) * attn), -1)
        if ctx.needs_input_grad[0]:
            # The transpose of the gather by one sort and segmented sums, shifted per corner.
            flat = top_left.reshape(-1)
            _, order = flat.sort()
            counts = torch.bincount(flat, minlength=table.shape[0])
            bag_starts = torch.cumsum(counts, 0) - counts  # one bag per table row, in sorted order
            output_row = torch.div(order, k, rounding_mode="floor")  # n of each sorted entry
            g = grad.to(table.dtype)
            w_sorted = corner_w.reshape(-1, 4)[order]
            blocks = table.shape[0] // sum(h * w for h, w in ctx.padded_shapes)
            per_corner = [
                F.embedding_bag(
                    output_row, g, bag_starts, per_sample_weights=w_sorted[:, c].contiguous(), mode="sum"
                ).view(blocks, -1, table.shape[1])
                for c in range(4)
            ]  # P_c[j] = sum over entries with top-left row j of w_c * grad[n]
            g_table = per_corner[0].clone()
            start = 0
            for hp, wp in ctx.padded_shapes:
                size = hp * wp
                for c, off in ((1, 1), (2, wp), (3, wp + 1)):
                    g_table[:, start + off : start + size] += per_corner[c][:, start : start + size - off]
                start += size
            g_table = g_table.view_as(table)
        return g_table, None, g_frac, g_attn, None, None


def _corner_offsets(padded_shapes: list[tuple[int, int]], n_points: int, device, dtype) -> Tensor:
    """(L*P, 4) row offsets of the 4 corners from the top-left one, per sampling point."""
    offs = torch.tensor([[0, 1, wp, wp + 1] for _, wp in padded_shapes], device=device, dtype=dtype)
    return offs.repeat_interleave(n_points, 0)
