import copy

import pytest
import torch

from odise_pl.inference.postprocess import panoptic_inference, semantic_inference


def reference_slide(m, images, window):
    """The official slide_forward written out: per window (stride = window, the last one aligned
    to the border) backbone + pyramid at the window's own size, summed, / the window count."""
    h, w = images.shape[-2:]
    ys = sorted({min(y, h - window) for y in range(0, h, window)})
    xs = sorted({min(x, w - window) for x in range(0, w, window)})
    sums, counts = {}, {}
    for y in ys:
        for x in xs:
            crop = images[..., y : y + window, x : x + window]
            inp = torch.nn.functional.interpolate(
                crop, size=(m.backbone_size,) * 2, mode="bicubic", antialias=True
            )
            inp = inp if window != m.backbone_size else crop
            pyr = m.pyramid(m.backbone(inp, *m.captioner(inp)), (window, window))
            for k, f in pyr.items():
                s = m.pyramid.strides[k]
                sums.setdefault(k, f.new_zeros(images.shape[0], f.shape[1], h // s, w // s))
                counts.setdefault(k, f.new_zeros(h // s, w // s))
                sums[k][..., y // s : (y + window) // s, x // s : (x + window) // s] += f
                counts[k][y // s : (y + window) // s, x // s : (x + window) // s] += 1
    return {k: sums[k] / counts[k] for k in sums}


def float64(m):
    """A float64 copy: the windows batched through the backbone and the per-window reference add
    the same float32 terms in different orders; in float64 only real differences remain."""
    return copy.deepcopy(m).double().eval()


@pytest.mark.parametrize(
    "size,window",
    [
        ((128, 320), 128),  # windows at x = 0, 128, 192 (the last aligned to the border)
        ((64, 192), 64),  # short side 64 < 128: windows of 64, each resized to 128 for the backbone
    ],
)
def test_sliding_window_averages_per_window_pyramids(tiny_odise, size, window):
    m = float64(tiny_odise)
    images = torch.rand(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        got, ref = m.features(images), reference_slide(m, images, window)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-10)
        assert m(images)["pred_masks"].shape[-2:] == (size[0] // 4, size[1] // 4)


def test_windows_one_per_pass_equal_all_together(tiny_odise):
    m = float64(tiny_odise)
    images = torch.rand(2, 3, 128, 256, dtype=torch.float64)
    with torch.no_grad():
        together = m.features(images)
        m.windows_per_pass = 1
        one = m.features(images)
    for k in together:
        torch.testing.assert_close(one[k], together[k], rtol=1e-10, atol=1e-10)


def test_implicit_captioner_starts_from_the_empty_caption(tiny_odise, tiny_text_encoder):
    cond, offset = tiny_odise.captioner(torch.rand(2, 3, 64, 64))
    empty = tiny_text_encoder([""])
    torch.testing.assert_close(cond, empty.expand(2, -1, -1))
    assert offset.shape == (2, 1, tiny_odise.backbone.time_embed_dim) and torch.count_nonzero(offset) == 0


def test_null_embedding_starts_at_clips_empty_string(tiny_odise, tiny_clip):
    # PARITY: the label model's null embedding is CLIP's raw embedding of "" (then projected)
    torch.testing.assert_close(tiny_odise.classifier.null_embed.detach()[0], tiny_clip.encode_text([""])[0])


def test_panoptic_inference_hand_worked():
    # 3 queries, 2 classes (0 thing, 1 stuff) + no-object; 1 x 4 image.
    big = 20.0
    logits = torch.tensor([[big, 0, 0], [0, big, 0], [0, 0, big]])  # q0: class 0, q1: class 1, q2: no-object
    masks = torch.tensor([[[big, big, -big, -big]], [[-big, -big, big, big]], [[big, big, big, big]]])
    pan, segs = panoptic_inference(logits.softmax(-1), masks, [True, False])
    assert pan.tolist() == [[1, 1, 2, 2]]
    assert [(s["category_id"], s["isthing"]) for s in segs] == [(0, True), (1, False)]
    # a query that loses most of its mask to a stronger one is dropped (overlap 0.8)
    # q0 score softmax([2, 0, 0])[0] = 0.787 keeps only pixel 3 of its 4 (0.25 < 0.8) -> dropped;
    # q1 (score ~1) wins pixels 0-2 and keeps all of its own mask.
    logits2 = torch.tensor([[2.0, 0, 0], [big, 0, 0]])
    masks2 = torch.tensor([[[big, big, big, big]], [[big, big, big, -big]]])
    pan2, segs2 = panoptic_inference(logits2.softmax(-1), masks2, [True, False])
    assert len(segs2) == 1 and pan2.tolist() == [[1, 1, 1, 0]]
    sem = semantic_inference(logits.softmax(-1), masks)
    assert sem.argmax(0).tolist() == [[0, 0, 1, 1]]
