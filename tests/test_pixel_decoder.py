import pytest
import torch

from odise_pl.model.ops import ms_deform_attn, ms_deform_attn_from_offsets
from odise_pl.model.pixel_decoder import MSDeformAttnPixelDecoder


def bilinear_zero_pad(img, x, y):
    """Sample (C, H, W) at continuous pixel coords (align_corners=False convention), zero outside."""
    c, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(torch.floor(px)), int(torch.floor(py))
    out = torch.zeros(c, dtype=img.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += wgt * img[:, yi, xi]
    return out


@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
def test_ms_deform_attn_equals_per_point_loop(impl):
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    b, m, dh, lq, p = 2, 2, 3, 5, 2
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, dh, dtype=torch.float64)
    loc = torch.rand(b, lq, m, len(shapes), p, 2, dtype=torch.float64) * 1.2 - 0.1
    wts = torch.rand(b, lq, m, len(shapes), p, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, loc, wts, impl)
    ref = torch.zeros(b, lq, m, dh, dtype=torch.float64)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for bi in range(b):
        for q in range(lq):
            for mi in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    img = value[bi, starts[lvl] : starts[lvl] + h * w, mi].T.reshape(dh, h, w)
                    for pi in range(p):
                        x, y = loc[bi, q, mi, lvl, pi]
                        ref[bi, q, mi] += wts[bi, q, mi, lvl, pi] * bilinear_zero_pad(img, x, y)
    torch.testing.assert_close(out, ref.reshape(b, lq, m * dh))


def _inputs(dtype, shapes, b=2, m=2, dh=3, lq=7, p=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, dh, dtype=dtype, generator=g)
    # Points inside, on the border and well outside every map (both corners beyond the zero border).
    loc = torch.rand(b, lq, m, len(shapes), p, 2, dtype=dtype, generator=g) * 3.0 - 1.0
    wts = torch.rand(b, lq, m, len(shapes), p, dtype=dtype, generator=g)
    return value, loc, wts


def test_gather_gradients_are_exact():
    """Our hand-written backward (sampled products, sort + shifted gathers) against finite
    differences in float64, for the values, the sampling locations and the attention weights."""
    shapes = [(3, 4), (2, 3), (1, 1)]
    inputs = [t.requires_grad_() for t in _inputs(torch.float64, shapes)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, "gather"), inputs, eps=1e-6, atol=1e-7
    )


def test_gather_equals_grid_sample_values_and_gradients():
    shapes = [(5, 6), (3, 3), (2, 2)]
    value, loc, wts = _inputs(torch.float64, shapes, m=3, dh=4, lq=40, p=3, seed=1)
    grad = torch.randn(2, 40, 12, dtype=torch.float64)
    results = []
    for impl in ("gather", "grid_sample"):
        x = [t.clone().requires_grad_() for t in (value, loc, wts)]
        out = ms_deform_attn(x[0], shapes, x[1], x[2], impl)
        results.append((out, *torch.autograd.grad(out, x, grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gather_under_bf16_autocast_stays_close_to_fp32():
    shapes = [(8, 8), (4, 4), (2, 2)]
    value, loc, wts = _inputs(torch.float32, shapes, m=2, dh=8, lq=30, p=4, seed=2)
    ref = ms_deform_attn(value, shapes, loc, wts, "gather")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), shapes, loc, wts, "gather")
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


def test_unknown_impl_is_rejected():
    value, loc, wts = _inputs(torch.float32, [(2, 2)])
    with pytest.raises(ValueError, match="gather, grid_sample or auto"):
        ms_deform_attn(value, [(2, 2)], loc, wts, "cuda_ext")
    with pytest.raises(ValueError, match="gather, grid_sample or auto"):  # at construction
        MSDeformAttnPixelDecoder(in_channels=16, conv_dim=32, num_layers=1, deform_attn_impl="cuda_ext")


def test_gather_refuses_devices_it_was_not_checked_on():
    value, loc, wts = (t.to("meta") for t in _inputs(torch.float32, [(2, 2)]))
    with pytest.raises(ValueError, match="tested on CPU only, got a meta tensor"):
        ms_deform_attn(value, [(2, 2)], loc, wts, "gather")


def test_pixel_decoder_shapes():
    dec = MSDeformAttnPixelDecoder(
        in_channels=16, conv_dim=32, mask_dim=24, num_layers=2, num_heads=4, dim_feedforward=32
    )
    feats = {f"s{i}": torch.randn(2, 16, 64 // 2 ** (i - 2), 96 // 2 ** (i - 2)) for i in range(2, 6)}
    mask_features, ms = dec(feats)
    assert mask_features.shape == (2, 24, 64, 96)
    assert [tuple(x.shape[-2:]) for x in ms] == [(8, 12), (16, 24), (32, 48)]


@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
def test_from_offsets_equals_locations_form(impl):
    # The pixel decoder's entry point: reference points + offsets in pixels of each level, the same
    # sampling locations as Deformable DETR's ref + offsets / (w, h); values and gradients.
    shapes = [(5, 6), (3, 3), (2, 2)]
    value, _, wts = _inputs(torch.float64, shapes, m=3, dh=4, lq=40, p=3, seed=4)
    g = torch.Generator().manual_seed(5)
    ref = torch.rand(2, 40, len(shapes), 2, dtype=torch.float64, generator=g)
    off = torch.randn(2, 40, 3, len(shapes), 3, 2, dtype=torch.float64, generator=g) * 2
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)
    grad = torch.randn(2, 40, 12, dtype=torch.float64, generator=g)
    results = []
    for form in ("offsets", "locations"):
        x = [t.clone().requires_grad_() for t in (value, ref, off, wts)]
        if form == "offsets":
            out = ms_deform_attn_from_offsets(x[0], shapes, x[1], x[2], x[3], impl)
        else:
            loc = x[1][:, :, None, :, None, :] + x[2] / size[:, None, :]
            out = ms_deform_attn(x[0], shapes, loc, x[3], impl)
        results.append((out, *torch.autograd.grad(out, x, grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gather_int64_indices_give_the_same_result(monkeypatch):
    # Past 2^31 table rows or sparse entries the gather switches to int64 indices; force it here.
    from odise_pl.model.ops import deform_attn_cpu as deform_attn

    shapes = [(5, 6), (3, 3), (2, 2)]
    value, loc, wts = _inputs(torch.float64, shapes, m=3, dh=4, lq=40, p=3, seed=6)
    grad = torch.randn(2, 40, 12, dtype=torch.float64)
    results = []
    for limit in (2**31, 16):
        monkeypatch.setattr(deform_attn, "_INT32_LIMIT", limit)
        x = [t.clone().requires_grad_() for t in (value, loc, wts)]
        out = ms_deform_attn(x[0], shapes, x[1], x[2], "gather")
        results.append((out, *torch.autograd.grad(out, x, grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_initialisation_follows_mask2formers_encoder():
    """PARITY: Xavier-uniform weight matrices in the encoder layers, each deformable attention's own
    initialisation on top (zero sampling-offset weights), and the level embedding N(0, 1)."""
    import math

    from odise_pl.model.pixel_decoder import MSDeformAttnPixelDecoder

    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(
        in_channels=32, conv_dim=128, mask_dim=128, num_layers=2, dim_feedforward=512
    )
    level = dec.level_embed.detach()
    n = level.numel()  # 384 draws: the sample std of N(0, 1) within 5 standard errors
    assert abs(level.std().item() - 1) < 5 / math.sqrt(2 * n) and abs(level.mean().item()) < 5 / math.sqrt(n)
    for layer in dec.layers:
        w = layer.linear1.weight.detach()
        bound = math.sqrt(6 / sum(w.shape))  # Xavier-uniform's bound; PyTorch's default is 1 / sqrt(fan_in)
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
        assert torch.count_nonzero(layer.self_attn.sampling_offsets.weight) == 0
