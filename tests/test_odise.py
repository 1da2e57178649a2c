import torch

from odise_pl.inference.postprocess import panoptic_inference, semantic_inference


def test_sliding_window_equals_per_window_backbone(tiny_odise):
    # 128 x 320 with a 128 window and stride 128: windows at x = 0, 128, 192 (last aligned to the
    # border); each feature location is the mean of the windows covering it.
    m = tiny_odise.eval()
    images = torch.rand(1, 3, 128, 320)
    with torch.no_grad():
        feats = m.extract_features(images)
        per = []
        for x in (0, 128, 192):
            crop = images[..., x : x + 128]
            per.append((x, m.backbone(crop, *m.captioner(crop))))
    name = "unet_up_11"  # stride 8
    ref = torch.zeros_like(feats[name])
    cnt = torch.zeros(1, 1, *ref.shape[-2:])
    for x, f in per:
        ref[..., x // 8 : x // 8 + 16] += f[name]
        cnt[..., x // 8 : x // 8 + 16] += 1
    torch.testing.assert_close(feats[name], ref / cnt)
    assert m(images)["pred_masks"].shape[-2:] == (32, 80)


def test_implicit_captioner_starts_from_the_empty_caption(tiny_odise, tiny_text_encoder):
    cond, offset = tiny_odise.captioner(torch.rand(2, 3, 64, 64))
    empty = tiny_text_encoder([""])
    torch.testing.assert_close(cond, empty.expand(2, -1, -1))
    assert torch.count_nonzero(offset) == 0


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
