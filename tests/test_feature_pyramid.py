import pytest
import torch

from odise_pl.model.feature_pyramid import FeaturePyramid


def test_strides_are_clamped_and_same_stride_features_summed():
    info = {"a": (8, 64), "b": (6, 32), "c": (4, 16), "d": (4, 8), "e": (3, 2), "f": (3, 4)}
    fp = FeaturePyramid(feature_info=info, out_channels=16).eval()
    feats = {n: torch.randn(1, c, 128 // s, 256 // s) for n, (c, s) in info.items()}
    out = fp(feats, (128, 256))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "s2": (1, 16, 32, 64),
        "s3": (1, 16, 16, 32),
        "s4": (1, 16, 8, 16),
        "s5": (1, 16, 4, 8),
    }
    # s5 = block_a(nearest-upsampled a) + block_b(b); s2 = block_e(downsampled e) + block_f(f)
    up_a = torch.nn.functional.interpolate(feats["a"], size=(4, 8), mode="nearest")
    torch.testing.assert_close(out["s5"], fp.blocks["a"](up_a) + fp.blocks["b"](feats["b"]))
    down_e = torch.nn.functional.interpolate(feats["e"], size=(32, 64), mode="nearest")
    torch.testing.assert_close(out["s2"], fp.blocks["e"](down_e) + fp.blocks["f"](feats["f"]))


def test_gradient_checkpointing_changes_nothing():
    info = {"a": (8, 32), "b": (8, 16), "c": (8, 8), "d": (8, 4)}
    torch.manual_seed(0)
    fp = FeaturePyramid(feature_info=info, out_channels=16, gradient_checkpointing=True).train()
    feats = {n: torch.randn(2, c, 64 // s, 64 // s, requires_grad=True) for n, (c, s) in info.items()}
    out = fp(feats, (64, 64))
    sum(v.sum() for v in out.values()).backward()
    g1 = [p.grad.clone() for p in fp.parameters()]
    fp.zero_grad()
    fp.gradient_checkpointing = False
    out2 = fp(feats, (64, 64))
    sum(v.sum() for v in out2.values()).backward()
    for a, b in zip(g1, [p.grad for p in fp.parameters()]):
        torch.testing.assert_close(a, b)


def test_missing_level_is_a_clear_error():
    with pytest.raises(ValueError, match=r"stride\(s\) \[4\]"):
        FeaturePyramid(feature_info={"a": (8, 32), "b": (8, 16), "c": (8, 8)})


def test_identity_shortcut_where_widths_agree():
    # PARITY: detectron2's BottleneckBlock has a projection shortcut only when in != out
    fp = FeaturePyramid(
        feature_info={"a": (16, 4), "b": (8, 8), "c": (16, 16), "d": (8, 32)}, out_channels=16
    )
    assert fp.blocks["a"].shortcut is None and fp.blocks["b"].shortcut is not None
    block, x = fp.blocks["a"].eval(), torch.randn(1, 16, 8, 8)
    y = block.norm3(
        block.conv3(torch.relu(block.norm2(block.conv2(torch.relu(block.norm1(block.conv1(x)))))))
    )
    torch.testing.assert_close(block(x), torch.relu(y + x))
