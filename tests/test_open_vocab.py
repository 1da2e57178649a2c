import math

import pytest
import torch

from odise_pl.inference.open_vocab import class_probabilities, clip_mask_logits, geometric_ensemble
from odise_pl.inference.postprocess import instance_inference
from odise_pl.inference.predictor import Predictor, seen_categories


def test_ensemble_equals_eq10_on_hand_worked_numbers():
    # Diffusion side over K + 1: [0.5, 0.3 | no-object 0.2]; over the K categories alone that is
    # [0.625, 0.375]. CLIP side: c = [0.2, 0.8].
    diff = torch.tensor([0.5, 0.3, 0.2]).log()
    clip = torch.tensor([0.2, 0.8]).log()
    seen = torch.tensor([True, False])
    got = geometric_ensemble(diff, clip, seen)
    a = 0.625**0.65 * 0.2**0.35  # seen: CLIP weight 0.35
    b = 0.375**0.35 * 0.8**0.65  # novel: CLIP weight 0.65
    # categories normalised and sharing 1 - p(no object); no object from the diffusion side
    assert got.tolist() == pytest.approx([0.8 * a / (a + b), 0.8 * b / (a + b), 0.2])
    assert got.sum().item() == pytest.approx(1.0)


def test_caption_models_take_no_object_from_the_objectness_head():
    diff = torch.tensor([0.5, 0.3, 0.2]).log()  # the null column is ignored for the no-object share
    clip = torch.tensor([0.2, 0.8]).log()
    objectness = torch.tensor([0.9, 0.1]).log()  # p(object) 0.9, p(no object) 0.1
    got = geometric_ensemble(diff, clip, torch.tensor([True, False]), objectness_logits=objectness)
    a, b = 0.625**0.65 * 0.2**0.35, 0.375**0.35 * 0.8**0.65
    assert got.tolist() == pytest.approx([0.9 * a / (a + b), 0.9 * b / (a + b), 0.1])
    only = class_probabilities(diff[None, None], mode="diffusion", objectness_logits=objectness[None, None])
    assert only[0, 0].tolist() == pytest.approx([0.9 * 0.625, 0.9 * 0.375, 0.1])


def test_unseen_weight_is_0_65_and_seen_0_35():
    diff = torch.tensor([0.25, 0.25, 0.5]).log()
    clip = torch.tensor([0.9, 0.1]).log()
    for seen, w in ((True, 0.35), (False, 0.65)):
        got = geometric_ensemble(diff, clip, torch.tensor([seen, seen]))
        ratio = got[0] / got[1]  # = (p0/p1)^(1-w) (c0/c1)^w = 9^w
        assert math.log(ratio) / math.log(9) == pytest.approx(w)


def test_modes():
    diff = torch.randn(1, 3, 4)
    masks = torch.randn(1, 3, 8, 8)
    dense = torch.randn(1, 5, 4, 4)
    text = torch.nn.functional.normalize(torch.randn(3, 1, 5), dim=-1)
    valid = torch.ones(3, 1, dtype=torch.bool)
    p = class_probabilities(diff, mode="diffusion")
    torch.testing.assert_close(p, diff.softmax(-1))
    c = class_probabilities(diff, masks, dense, text, valid, mode="clip")
    clip = clip_mask_logits(dense, masks, text, valid, 100.0).softmax(-1)
    # clip mode: classes by CLIP alone (renormalised together with the diffusion no-object)
    torch.testing.assert_close(c[..., :3] / c[..., :3].sum(-1, keepdim=True), clip)
    with pytest.raises(ValueError, match="mode"):
        class_probabilities(diff, mode="both")


def test_clip_mask_pooling_picks_the_masked_features():
    dense = torch.zeros(1, 2, 4, 4)
    dense[0, 0, :, :2] = 1.0  # left half points to category 0
    dense[0, 1, :, 2:] = 1.0  # right half to category 1
    masks = torch.full((1, 2, 16, 16), -10.0)
    masks[0, 0, :, :8] = 10.0
    masks[0, 1, :, 8:] = 10.0
    text = torch.eye(2)[:, None, :]
    logits = clip_mask_logits(dense, masks, text, torch.ones(2, 1, dtype=torch.bool), 10.0)
    assert logits[0].argmax(-1).tolist() == [0, 1]
    torch.testing.assert_close(logits[0], torch.tensor([[10.0, 0.0], [0.0, 10.0]]))


def test_seen_categories_by_any_synonym():
    assert seen_categories([["cat", "kitty"], ["zebra"]], [["Kitty"], ["dog"]]).tolist() == [True, False]
    assert seen_categories([["cat"]], None).tolist() == [False]


def test_instance_inference_keeps_things_topk():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])  # K = 2: class 0 thing, class 1 stuff
    masks = torch.tensor([[[5.0, -5.0]], [[-5.0, 5.0]]])
    out = instance_inference(probs, masks, [True, False], topk=4)  # all 4 (query, class) pairs
    assert out["labels"].tolist() == [0, 0]  # only the thing class; q0 then q1
    assert out["masks"][0].tolist() == [[True, False]]
    s = torch.sigmoid(torch.tensor(5.0)).item()
    assert out["scores"].tolist() == pytest.approx([0.7 * s, 0.1 * s], rel=1e-5)


def test_predictor_outputs_every_task_at_original_size(tiny_odise):
    pred = Predictor(tiny_odise.eval(), mode="ensemble", train_vocabulary=[["circle"]])
    images = torch.rand(1, 3, 128, 192)
    meta = [{"input_size": (128, 160), "height": 100, "width": 125}]
    out = pred(images, meta, [["circle"], ["sky", "heaven"]], [True, False])[0]
    ids, segs = out["panoptic"]
    assert ids.shape == (100, 125) and out["semantic"].shape == (2, 100, 125)
    assert out["probs"].shape[-1] == 3 and out["probs"].sum(-1).allclose(torch.ones(out["probs"].shape[0]))
    assert all(s["category_id"] in (0, 1) for s in segs)
