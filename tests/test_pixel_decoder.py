import torch

from odise_pl.model.pixel_decoder import MSDeformAttnPixelDecoder, ms_deform_attn


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


def test_ms_deform_attn_equals_per_point_loop():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    b, m, dh, lq, p = 2, 2, 3, 5, 2
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, dh, dtype=torch.float64)
    loc = torch.rand(b, lq, m, len(shapes), p, 2, dtype=torch.float64) * 1.2 - 0.1
    wts = torch.rand(b, lq, m, len(shapes), p, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, loc, wts)
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


def test_pixel_decoder_shapes():
    dec = MSDeformAttnPixelDecoder(
        in_channels=16, conv_dim=32, mask_dim=24, num_layers=2, num_heads=4, dim_feedforward=32
    )
    feats = {f"s{i}": torch.randn(2, 16, 64 // 2 ** (i - 2), 96 // 2 ** (i - 2)) for i in range(2, 6)}
    mask_features, ms = dec(feats)
    assert mask_features.shape == (2, 24, 64, 96)
    assert [tuple(x.shape[-2:]) for x in ms] == [(8, 12), (16, 24), (32, 48)]
