"""The masked-attention decoder's shortcuts are exact: attention masks from resized mask features
equal Mask2Former's resized mask logits; skipping auxiliary sets at inference changes nothing;
predicting all sets in one product equals predicting them one by one (values and gradients)."""

import torch
import torch.nn.functional as F

from odise_pl.model.transformer_decoder import MaskedTransformerDecoder


def make(seed=0):
    torch.manual_seed(seed)
    dec = MaskedTransformerDecoder(
        in_channels=32, mask_dim=32, hidden_dim=32, num_queries=10, num_heads=4, dim_feedforward=64,
        num_layers=3, embed_dim=16,
    )  # fmt: skip
    ms = [torch.randn(2, 32, s, s) for s in (4, 8, 16)]
    return dec, ms, torch.randn(2, 32, 32, 32)


def test_attention_mask_equals_resized_full_resolution_logits():
    dec, _, mf = make()
    output = torch.randn(2, 10, 32)
    for size in ((4, 4), (8, 8), (16, 16)):
        small = F.interpolate(mf, size=size, mode="bilinear", align_corners=False)
        out, mask_embed, attn = dec._attention_mask(output, small)
        masks = dec._predict_sets([(out, mask_embed)], mf)[0]["pred_masks"]
        # Mask2Former's way: resize the full-resolution logits, threshold the sigmoid at 0.5.
        ref_logits = F.interpolate(masks.detach(), size=size, mode="bilinear", align_corners=False)
        ref = (ref_logits.sigmoid().flatten(2) < 0.5).repeat_interleave(4, dim=0)
        near_zero = (ref_logits.abs().flatten(2) < 1e-5).repeat_interleave(4, dim=0)
        assert torch.equal(attn[~near_zero], ref[~near_zero])


def test_inference_skips_auxiliary_sets_without_changing_the_result():
    dec, ms, mf = make()
    dec.train()
    with torch.no_grad():
        full = dec(ms, mf)
    dec.eval()
    with torch.no_grad():
        fast = dec(ms, mf)
    assert len(full["aux_outputs"]) == 3 and "aux_outputs" not in fast
    assert torch.allclose(full["pred_masks"], fast["pred_masks"], atol=1e-6)
    assert torch.allclose(full["mask_embed"], fast["mask_embed"], atol=1e-6)


def test_sets_predicted_together_equal_one_by_one():
    # float64: the two forms add the same float32 terms in different orders (one product vs one per
    # set); in float64 any difference beyond round-off would be a real one
    dec, _, mf = make()
    dec, mf = dec.double(), mf.double()
    heads = []
    for seed in range(4):
        torch.manual_seed(seed)
        out, mask_embed, _ = dec._attention_mask(
            torch.randn(2, 10, 32, dtype=torch.float64), mf[:, :, :4, :4]
        )
        heads.append((out, mask_embed))
    mf = mf.clone().requires_grad_()
    weights = (
        [torch.randn(2, 10, 32, 32, dtype=torch.float64) for _ in heads],
        [torch.randn(2, 10, 16, dtype=torch.float64) for _ in heads],
    )

    def loss(preds):
        return sum(
            (p["pred_masks"] * wm).sum() + (p["mask_embed"] * we).sum() for p, wm, we in zip(preds, *weights)
        )

    together = dec._predict_sets(heads, mf)
    g_together = torch.autograd.grad(
        loss(together), [mf, *dec.parameters()], retain_graph=True, allow_unused=True
    )
    alone = [dec._predict_sets([h], mf)[0] for h in heads]
    g_alone = torch.autograd.grad(loss(alone), [mf, *dec.parameters()], allow_unused=True)
    for p1, p2 in zip(together, alone):
        torch.testing.assert_close(p1["pred_masks"], p2["pred_masks"])
        torch.testing.assert_close(p1["mask_embed"], p2["mask_embed"])
    for a, b in zip(g_together, g_alone):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_objectness_head_on_every_set_only_when_asked():
    torch.manual_seed(0)
    kw = dict(in_channels=32, mask_dim=32, hidden_dim=32, num_queries=10, num_heads=4, dim_feedforward=64)
    dec = MaskedTransformerDecoder(**kw, num_layers=3, embed_dim=16, objectness=True).train()
    _, ms, mf = make()
    out = dec(ms, mf)
    assert out["pred_objectness"].shape == (2, 10, 2)
    assert all(a["pred_objectness"].shape == (2, 10, 2) for a in out["aux_outputs"])
    # the head reads the normed query output of its own set: the final set's is the eval output
    dec.eval()
    with torch.no_grad():
        ev = dec(ms, mf)
    torch.testing.assert_close(ev["pred_objectness"], out["pred_objectness"].detach(), atol=1e-6, rtol=1e-5)
    plain = MaskedTransformerDecoder(**kw, num_layers=3, embed_dim=16)
    assert "pred_objectness" not in plain(ms, mf) and plain.class_embed is None
