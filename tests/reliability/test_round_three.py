"""Reliability, round three: inputs that used to end in a traceback are one line naming the file and
the fix; every entry point refuses an unusable output location before it works; training refuses a
dataset with two categories of one name, as evaluation does."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from odise_pl.config import CONFIG_DIR
from odise_pl.data.prepare.ade20k_full import load_ade_full_index
from odise_pl.data.synthetic import write_dataset
from odise_pl.errors import DatasetError, OutputError, VocabularyError
from odise_pl.evaluation.panoptic_quality import main as pq_main
from odise_pl.evaluation.perturb import write_predictions

from test_train import cfg_for


@pytest.fixture(scope="module")
def pq_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq3")
    write_dataset(root, num_train=1, num_val=3, seed=3)
    gt_json = root / "annotations" / "panoptic_val2017.json"
    gt_folder = root / "annotations" / "panoptic_val2017"
    pred_json, pred_folder = write_predictions(gt_json, gt_folder, root / "pred", seed=0)
    return gt_json, gt_folder, Path(pred_json), Path(pred_folder)


def _pq(gt_json, gt_folder, pred_json, pred_folder, *extra) -> list[str]:
    args = ["--gt-json", str(gt_json), "--gt-folder", str(gt_folder), "--pred-json", str(pred_json)]
    return [*args, "--pred-folder", str(pred_folder), "--workers", "1", *extra]


def _edit(src: Path, dst: Path, change) -> Path:
    data = json.loads(src.read_text())
    dst.write_text(change(data) if callable(change) else change)
    return dst


def _drop_segments_info(d):
    del d["annotations"][0]["segments_info"]
    return json.dumps(d)


def _unknown_category(d):
    d["annotations"][0]["segments_info"][0]["category_id"] = 777
    return json.dumps(d)


@pytest.mark.parametrize(
    "case, message",
    [
        ("list", "the top level is a list, not an object with 'annotations'"),
        ("invalid", "is not valid JSON"),
        ("null", "'annotations' is null, not a list"),
        ("no_segments_info", "annotation 0 (image"),
        ("category_777", "has category_id 777, not one of the ground truth's categories"),
        ("missing_png", "cannot read panoptic PNG"),
        ("output_in_missing_folder", "cannot write into"),
    ],
)
def test_panoptic_quality_cli_inputs_are_one_line(pq_files, tmp_path, capsys, case, message):
    gt_json, gt_folder, pred_json, pred_folder = pq_files
    extra = []
    if case == "list":
        pred_json = _edit(pred_json, tmp_path / "p.json", "[]")
    elif case == "invalid":
        pred_json = _edit(pred_json, tmp_path / "p.json", "{not json")
    elif case == "null":
        pred_json = _edit(pred_json, tmp_path / "p.json", json.dumps({"annotations": None}))
    elif case == "no_segments_info":
        pred_json = _edit(pred_json, tmp_path / "p.json", _drop_segments_info)
    elif case == "category_777":
        pred_json = _edit(pred_json, tmp_path / "p.json", _unknown_category)
    elif case == "missing_png":
        folder = tmp_path / "pred"
        shutil.copytree(pred_folder, folder)
        next(folder.glob("*.png")).unlink()
        pred_folder = folder
    elif case == "output_in_missing_folder":
        missing = tmp_path / "file"
        missing.write_text("x")  # a file where the output's folder should be
        extra = ["--output", str(missing / "sub" / "results.json")]
    assert pq_main(_pq(gt_json, gt_folder, pred_json, pred_folder, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("top", [[1, 2], "index", 42])
def test_ade20k_index_whose_top_level_is_not_a_dict(tmp_path, top):
    path = tmp_path / "index_ade20k.pkl"
    path.write_bytes(pickle.dumps(top))
    with pytest.raises(DatasetError, match="its top level is a .*, not a dict"):
        load_ade_full_index(path)


def test_a_run_folder_that_is_a_file_is_one_line(tmp_path):
    from odise_pl.train import train

    (tmp_path / "out").write_text("a file where the run folder goes")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        train(cfg_for(tmp_path))


def test_eval_refuses_an_unusable_output_before_evaluating(tmp_path, monkeypatch):
    import odise_pl.eval as eval_module

    def no_work(*a, **k):
        raise AssertionError("evaluated before the output was checked")

    monkeypatch.setattr(eval_module, "evaluate_dataset", no_work)
    (tmp_path / "results").write_text("a file")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "eval", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/results"]
        )
    with pytest.raises(OutputError, match="is not a folder"):
        eval_module.evaluate(cfg)


@pytest.mark.parametrize("script", ["pascal_voc", "pascal_context"])
def test_prepare_scripts_refuse_an_unusable_output_before_reading(tmp_path, script):
    from odise_pl.data.prepare import prepare_pascal_context, prepare_pascal_voc

    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(OutputError, match="is not a folder"):
        if script == "pascal_voc":
            prepare_pascal_voc(tmp_path / "missing_voc", out)
        else:
            prepare_pascal_context(tmp_path / "v", tmp_path / "l", out, tmp_path / "split.txt")


def test_training_refuses_two_categories_of_one_name(tmp_path):
    from odise_pl.train import train

    root = tmp_path / "data" / "synthetic"
    write_dataset(root, num_train=2, num_val=1, seed=0)
    for split in ("train", "val"):
        p = root / "annotations" / f"panoptic_{split}2017.json"
        d = json.loads(p.read_text())
        d["categories"][1]["name"] = d["categories"][0]["name"]
        p.write_text(json.dumps(d))
    cfg = cfg_for(tmp_path, "model.train_vocabulary=dataset", f"paths.synthetic={root}")
    with pytest.raises(VocabularyError, match="training dataset's categories: .* names two categories"):
        train(cfg)
