import contextlib
import io
import json

import numpy as np
import pytest

from odise_pl.data.synthetic import write_dataset
from odise_pl.errors import PanopticEvalError
from odise_pl.evaluation.panoptic_quality import evaluate_files, image_stats, main, summarize
from odise_pl.evaluation.perturb import write_predictions


@pytest.fixture(scope="module")
def gt_and_pred(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    write_dataset(root, num_train=1, num_val=30, seed=3)
    gt_json = root / "annotations" / "panoptic_val2017.json"
    gt_folder = root / "annotations" / "panoptic_val2017"
    preds = [write_predictions(gt_json, gt_folder, root / f"p{s}", seed=s) for s in range(3)]
    return gt_json, gt_folder, preds


def coco_api(gt_json, gt_folder, pred_json, pred_folder):
    from panopticapi.evaluation import pq_compute

    with contextlib.redirect_stdout(io.StringIO()):
        return pq_compute(str(gt_json), str(pred_json), str(gt_folder), str(pred_folder))


def test_agrees_with_coco_panoptic_api(gt_and_pred):
    gt_json, gt_folder, preds = gt_and_pred
    for pred_json, pred_folder in preds:
        ref = coco_api(gt_json, gt_folder, pred_json, pred_folder)
        ours = evaluate_files(gt_json, gt_folder, pred_json, pred_folder, workers=2)
        for group in ("All", "Things", "Stuff"):
            for m in ("pq", "sq", "rq"):
                assert ours[group][m] == pytest.approx(ref[group][m], abs=1e-6), (group, m)
            assert ours[group]["n"] == ref[group]["n"]
        for cid, r in ref["per_class"].items():
            for m in ("pq", "sq", "rq"):
                assert ours["per_class"][cid][m] == pytest.approx(r[m], abs=1e-6)


def test_identical_segmentation_is_perfect(gt_and_pred, tmp_path):
    gt_json, gt_folder, _ = gt_and_pred
    gt = json.load(open(gt_json))
    pred_json = tmp_path / "same.json"
    json.dump(
        {
            "annotations": [
                {
                    **a,
                    "segments_info": [
                        {"id": s["id"], "category_id": s["category_id"]} for s in a["segments_info"]
                    ],
                }
                for a in gt["annotations"]
            ]
        },
        open(pred_json, "w"),
    )
    r = evaluate_files(gt_json, gt_folder, pred_json, gt_folder, workers=1)
    assert r["All"]["pq"] == pytest.approx(1.0)


def test_hand_worked_case():
    # 1 x 10 image. GT: thing A (cat 1, 4 px), stuff B (cat 2, 4 px), VOID 2 px.
    gt = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]], dtype=np.uint32)
    gts = [
        {"id": 1, "category_id": 1, "iscrowd": 0, "area": 4},
        {"id": 2, "category_id": 2, "iscrowd": 0, "area": 4},
    ]
    # pred 7 covers 3 of A + both VOID px -> IoU = 3 / (5 + 4 - 3 - 2) = 0.75 -> TP
    # pred 8 (cat 2) covers 1 px of B -> IoU 0.25 -> FP; B -> FN
    pred = np.array([[0, 7, 7, 7, 8, 0, 0, 0, 7, 7]], dtype=np.uint32)
    preds = [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 2}]
    st = image_stats(gt, gts, pred, preds, {1: 0, 2: 1})
    assert st[0].tolist() == pytest.approx([0.75, 1, 0, 0])
    assert st[1].tolist() == pytest.approx([0.0, 0, 1, 1])
    r = summarize(st, [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}])
    assert r["Things"]["pq"] == pytest.approx(0.75) and r["Stuff"]["pq"] == 0.0 and r["All"]["n"] == 2


def test_inconsistent_predictions_are_named():
    gt = np.zeros((2, 2), np.uint32)
    with pytest.raises(PanopticEvalError, match="in the prediction PNG but not in its JSON"):
        image_stats(gt, [], np.full((2, 2), 5, np.uint32), [], {1: 0}, image="img 3")
    with pytest.raises(PanopticEvalError, match="unknown category_id 9"):
        image_stats(gt, [], np.full((2, 2), 5, np.uint32), [{"id": 5, "category_id": 9}], {1: 0})
    with pytest.raises(PanopticEvalError, match="not in its PNG"):
        image_stats(gt, [], gt, [{"id": 5, "category_id": 1}], {1: 0})


def test_cli_prints_table_and_writes_json(gt_and_pred, tmp_path, capsys):
    gt_json, gt_folder, preds = gt_and_pred
    out = tmp_path / "r.json"
    rc = main(
        [
            "--gt-json",
            str(gt_json),
            "--gt-folder",
            str(gt_folder),
            "--pred-json",
            str(preds[0][0]),
            "--pred-folder",
            str(preds[0][1]),
            "--output",
            str(out),
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    assert "Things" in capsys.readouterr().out
    res = json.load(open(out))
    assert set(res) == {"All", "Things", "Stuff", "per_class"} and 0 <= res["All"]["pq"] <= 1
    assert main(["--gt-json", "nope.json", "--gt-folder", ".", "--pred-json", "x", "--pred-folder", "."]) == 2


def _noisy_case(rng, h, w, noise):
    """A blocky GT map (large 24-bit ids, crowd, VOID, an id its JSON does not list) and a
    prediction that copies it with a fraction ``noise`` of pixels set to random predicted ids."""
    n_gt = 8
    gt_ids = rng.choice(np.arange(1, 1 << 24), size=n_gt + 1, replace=False)
    blocks = rng.integers(0, n_gt + 2, size=(h // 4 + 1, w // 4 + 1))
    table = np.concatenate([[0], gt_ids])  # block value 0 -> VOID, n_gt + 1 -> unlisted id
    gt = table[blocks].repeat(4, 0).repeat(4, 1)[:h, :w]
    gt_segs = [
        {"id": int(i), "category_id": int(1 + k % 3), "iscrowd": int(k == 1), "area": int((gt == i).sum())}
        for k, i in enumerate(gt_ids[:n_gt])
        if (gt == i).any()
    ]
    pred = gt.copy()
    pred[np.isin(pred, gt_ids[n_gt:])] = 0  # the unlisted GT id is not a prediction
    mask = rng.random((h, w)) < noise
    pred[mask] = rng.choice([0, 777, 99999, 1 << 23], size=int(mask.sum()))
    p_ids = [int(i) for i in np.unique(pred) if i]
    p_segs = [{"id": i, "category_id": int(1 + i % 3)} for i in p_ids]
    return gt, gt_segs, pred, p_segs


@pytest.mark.parametrize("noise", [0.0, 0.05, 1.0])
def test_agrees_with_coco_api_on_noisy_maps(tmp_path, noise):
    # From piecewise-constant maps (few long runs) to every pixel its own run: the run-length pair
    # count must give the COCO API's numbers either way.
    from PIL import Image

    from odise_pl.data.io import ids_to_rgb

    rng = np.random.default_rng(int(noise * 100))
    cats = [{"id": c, "name": f"c{c}", "isthing": int(c != 3)} for c in (1, 2, 3)]
    gt_json, pred_json = {"categories": cats, "annotations": []}, {"annotations": []}
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    for img in range(4):
        gt, gt_segs, pred, p_segs = _noisy_case(rng, 37 + 8 * img, 53, noise)
        name = f"{img}.png"
        Image.fromarray(ids_to_rgb(gt)).save(tmp_path / "gt" / name)
        Image.fromarray(ids_to_rgb(pred)).save(tmp_path / "pred" / name)
        gt_json["annotations"].append({"image_id": img, "file_name": name, "segments_info": gt_segs})
        pred_json["annotations"].append({"image_id": img, "file_name": name, "segments_info": p_segs})
    gt_json["images"] = [{"id": i, "file_name": f"{i}.jpg"} for i in range(4)]
    json.dump(gt_json, open(tmp_path / "gt.json", "w"))
    json.dump(pred_json, open(tmp_path / "pred.json", "w"))
    args = (tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json", tmp_path / "pred")
    ref = coco_api(*args)
    ours = evaluate_files(*args, workers=1)
    assert ref["All"]["n"] > 0
    for group in ("All", "Things", "Stuff"):
        for m in ("pq", "sq", "rq"):
            assert ours[group][m] == pytest.approx(ref[group][m], abs=1e-12), (group, m)


def test_empty_image_counts_nothing():
    empty = np.zeros((0, 5), np.uint32)
    assert not image_stats(empty, [], empty, [], {1: 0}).any()
