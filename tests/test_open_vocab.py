import math

import pytest
import torch

from odise_pl.inference.open_vocab import (
    class_probabilities,
    ensemble_logits,
    mask_class_scores,
    pooled_clip_logits,
    seen_categories,
)
from odise_pl.inference.postprocess import instance_inference
from odise_pl.inference.predictor import Predictor


def eps_softmax(p: list[float]) -> list[float]:
    """The official post-processing's view of probabilities p: softmax(log(p + 1e-8))."""
    q = [x + 1e-8 for x in p]
    return [x / sum(q) for x in q]


def test_ensemble_equals_eq10_on_hand_worked_numbers():
    # Diffusion side over K + 1: [0.5, 0.3 | no-object 0.2]; over the K categories alone that is
    # [0.625, 0.375]. CLIP side: c = [0.2, 0.8]. Label model: CLIP weight 0.3 seen, 0.7 novel.
    diff = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    clip = torch.tensor([0.2, 0.8], dtype=torch.float64).log()
    seen = torch.tensor([True, False])
    a = 0.625**0.7 * 0.2**0.3  # seen: CLIP weight 0.3
    b = 0.375**0.3 * 0.8**0.7  # novel: CLIP weight 0.7
    assert ensemble_logits(diff[:2], clip, seen, 0.3, 0.7).exp().tolist() == pytest.approx([a, b])
    got = class_probabilities(diff, clip, seen, alpha=0.3, beta=0.7)
    # categories normalised and sharing 1 - p(no object); no object from the diffusion side
    assert got.tolist() == pytest.approx(eps_softmax([0.8 * a / (a + b), 0.8 * b / (a + b), 0.2]), rel=1e-12)
    assert got.sum().item() == pytest.approx(1.0)


def test_caption_models_take_no_object_from_the_objectness_head():
    diff = torch.tensor([0.5, 0.3], dtype=torch.float64).log()  # K columns only
    clip = torch.tensor([0.2, 0.8], dtype=torch.float64).log()
    objectness = torch.tensor([0.9, 0.1], dtype=torch.float64).log()  # p(object) 0.9, p(no object) 0.1
    got = class_probabilities(
        diff, clip, torch.tensor([True, False]), alpha=0.35, beta=0.65, objectness_logits=objectness
    )
    a, b = 0.625**0.65 * 0.2**0.35, 0.375**0.35 * 0.8**0.65
    assert got.tolist() == pytest.approx(eps_softmax([0.9 * a / (a + b), 0.9 * b / (a + b), 0.1]), rel=1e-12)
    only = class_probabilities(diff, mode="diffusion", objectness_logits=objectness)
    assert only.tolist() == pytest.approx(eps_softmax([0.9 * 0.625, 0.9 * 0.375, 0.1]), rel=1e-12)


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.7), (0.35, 0.65)])
def test_seen_and_novel_weights(alpha, beta):
    diff = torch.tensor([0.25, 0.25], dtype=torch.float64).log()
    clip = torch.tensor([0.9, 0.1], dtype=torch.float64).log()
    for seen, w in ((True, alpha), (False, beta)):
        got = ensemble_logits(diff, clip, torch.tensor([seen, seen]), alpha, beta)
        # log ratio = (1 - w) log(p0 / p1) + w log(c0 / c1) = w log 9
        assert ((got[0] - got[1]) / math.log(9)).item() == pytest.approx(w)


def test_ensemble_stays_finite_where_a_probability_underflows():
    # float64 softmax of a 1000-logit gap is 0: the official log(p^(1-w) q^w) would be -inf, then NaN
    diff = torch.tensor([[0.0, -1000.0, 0.0]], dtype=torch.float64)
    clip = torch.tensor([[0.0, 5.0]], dtype=torch.float64)
    probs = class_probabilities(diff, clip, torch.tensor([False, False]))
    assert torch.isfinite(probs).all() and probs[0, 1] > 0


def test_no_object_scores_as_the_official_code_writes_them():
    logits = torch.tensor([[2.0, 0.5, -1.0]], dtype=torch.float64)
    p0 = torch.tensor([0.25], dtype=torch.float64)
    scores = mask_class_scores(logits, p0)
    expected = torch.cat([logits.softmax(-1) * 0.75, p0[:, None]], -1)
    torch.testing.assert_close(scores, (expected + 1e-8).log())


def test_modes():
    diff = torch.randn(1, 3, 4, dtype=torch.float64)
    clip = torch.randn(1, 3, 3, dtype=torch.float64)
    p = class_probabilities(diff, mode="diffusion")
    torch.testing.assert_close(p, (diff.softmax(-1) + 1e-8) / (1 + 4e-8))
    c = class_probabilities(diff, clip, mode="clip")
    # clip mode: categories by CLIP alone (renormalised together with the diffusion no-object)
    torch.testing.assert_close(
        c[..., :3] / c[..., :3].sum(-1, keepdim=True), clip.softmax(-1), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(ValueError, match="mode"):
        class_probabilities(diff, mode="both")
    with pytest.raises(ValueError, match="needs CLIP"):
        class_probabilities(diff, mode="ensemble")


def test_pooling_alternative_picks_the_masked_features():
    dense = torch.zeros(1, 2, 4, 4)
    dense[0, 0, :, :2] = 1.0  # left half points to category 0
    dense[0, 1, :, 2:] = 1.0  # right half to category 1
    masks = torch.full((1, 2, 16, 16), -10.0)
    masks[0, 0, :, :8] = 10.0
    masks[0, 1, :, 8:] = 10.0
    text = torch.eye(2)[:, None, :] * 3.0  # raw (not unit) text embeddings: the cosine normalises
    logits = pooled_clip_logits(dense, masks, text, torch.ones(2, 1, dtype=torch.bool), 10.0)
    torch.testing.assert_close(logits[0], torch.tensor([[10.0, 0.0], [0.0, 10.0]]))


def test_seen_categories_by_any_synonym_exactly():
    assert seen_categories([["cat", "kitty"], ["zebra"]], [["kitty"], ["dog"]]).tolist() == [True, False]
    # PARITY: exact strings, as the official set intersection
    assert seen_categories([["Cat"]], [["cat"]]).tolist() == [False]
    assert seen_categories([["cat"]], None).tolist() == [False]


def test_instance_inference_keeps_things_topk():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])  # K = 2: class 0 thing, class 1 stuff
    masks = torch.tensor([[[5.0, -5.0]], [[-5.0, 5.0]]])
    out = instance_inference(probs, masks, [True, False], topk=4)  # all 4 (query, class) pairs
    assert out["labels"].tolist() == [0, 0] and out["query"].tolist() == [0, 1]  # only the thing class
    assert out["masks"][0].tolist() == [[True, False]]
    s = torch.sigmoid(torch.tensor(5.0)).item()
    assert out["scores"].tolist() == pytest.approx([0.7 * s, 0.1 * s], rel=1e-5)


@pytest.mark.parametrize(
    "clip_side,region", [("maskclip", "padded"), ("maskclip", "image"), ("pooling", "padded")]
)
def test_predictor_outputs_every_task_at_original_size(tiny_odise, clip_side, region):
    pred = Predictor(
        tiny_odise.eval(),
        mode="ensemble",
        train_vocabulary=[["circle"]],
        clip_side=clip_side,
        clip_mask_region=region,
    )
    images = torch.rand(1, 3, 128, 192)
    meta = [{"input_size": (128, 160), "height": 100, "width": 125}]
    out = pred(images, meta, [["circle"], ["sky", "heaven"]], [True, False])[0]
    ids, segs = out["panoptic"]
    assert ids.shape == (100, 125) and out["semantic"].shape == (2, 100, 125)
    assert out["probs"].shape[-1] == 3 and out["probs"].sum(-1).allclose(torch.ones(out["probs"].shape[0]))
    assert all(s["category_id"] in (0, 1) for s in segs)


def test_predictor_gives_maskclip_the_region_a_batch_of_one_would_have(tiny_odise, monkeypatch):
    """In a batch padded beyond this image's own padding, MaskCLIP still gets the masks over the
    image padded to 64 alone, as the official code at batch size 1 (``clip_mask_region=padded``).
    """
    seen = []
    original = tiny_odise.clip.mask_embeddings

    def spy(image, masks, *a, **k):
        seen.append((tuple(image.shape[-2:]), tuple(masks.shape[-2:])))
        return original(image, masks, *a, **k)

    monkeypatch.setattr(tiny_odise.clip, "mask_embeddings", spy)
    images = torch.rand(1, 3, 192, 256)
    meta = [{"input_size": (100, 130), "height": 100, "width": 130}]
    Predictor(tiny_odise.eval())(images, meta, [["circle"], ["sky"]], [True, False])
    assert seen == [((100, 130), (128 // 4, 192 // 4))]
    seen.clear()
    Predictor(tiny_odise.eval(), clip_mask_region="image")(images, meta, [["circle"], ["sky"]], [True, False])
    assert seen == [((100, 130), (100, 130))]
