"""Your own data, end to end (README "Your own data"): a dataset of other categories (apple; banana;
table; wall, non-contiguous ids) exported as COCO *instance* JSON + stuff PNGs, converted, a
`make train`-style checkpoint fine-tuned on it with `init_from`, evaluated with its own vocabulary,
its folder segmented with `odise_pl.predict`; the predictions scored by our PQ and by panopticapi
alike. Then predict's guarantees: 2 processes write exactly the files of 1, an interrupted run
resumed equals an uninterrupted one, an unreadable image is skipped and retried."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from pycocotools import mask as mask_utils

from odise_pl.config import CONFIG_DIR
from odise_pl.data.convert import convert_instances
from odise_pl.errors import CheckpointError, ConfigError
from odise_pl.eval import evaluate
from odise_pl.evaluation.panoptic_quality import evaluate_files
from odise_pl.predict import predict
from odise_pl.train import train

from test_train import cfg_for

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [
    {"id": 3, "name": "apple"},
    {"id": 5, "name": "banana"},
    {"id": 11, "name": "table", "isthing": 0},
    {"id": 12, "name": "wall", "isthing": 0},
]
H, W = 96, 128


def export(tmp: Path, split: str, n: int, seed: int) -> tuple[Path, Path, Path]:
    """An annotation tool's export: images with fruit (instances as polygons and RLE) on a table in
    front of a wall (stuff PNGs)."""
    rng = np.random.default_rng(seed)
    images, stuff = tmp / f"{split}_images", tmp / f"{split}_stuff"
    images.mkdir()
    stuff.mkdir()
    anns, infos = [], []
    for i in range(n):
        img = np.zeros((H, W, 3), np.uint8)
        labels = np.full((H, W), 12, np.uint8)  # wall
        img[:] = (120, 110, 100)
        labels[H // 2 :] = 11  # table
        img[H // 2 :] = (140, 90, 40)
        for k in range(int(rng.integers(1, 4))):
            cat = int(rng.choice([3, 5]))
            cy, cx, r = int(rng.integers(20, H - 20)), int(rng.integers(20, W - 20)), int(rng.integers(6, 14))
            yy, xx = np.mgrid[:H, :W]
            mask = (yy - cy) ** 2 + ((xx - cx) / (1.0 if cat == 3 else 2.0)) ** 2 < r**2
            img[mask] = (200, 30, 30) if cat == 3 else (230, 210, 40)
            if k % 2:
                enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                seg = {"size": enc["size"], "counts": enc["counts"].decode()}
            else:
                seg = [[float(cx - r), float(cy - r), float(cx + r), float(cy - r), float(cx + r), float(cy + r),
                        float(cx - r), float(cy + r)]]  # fmt: skip
            anns.append({"id": len(anns) + 1, "image_id": 1000 * seed + i, "category_id": cat, "iscrowd": 0,
                         "segmentation": seg})  # fmt: skip
        name = f"{split}_{i:03d}.jpg"
        Image.fromarray(img).save(images / name, quality=95)
        Image.fromarray(labels).save(stuff / f"{split}_{i:03d}.png")
        infos.append({"id": 1000 * seed + i, "file_name": name, "height": H, "width": W})
    path = tmp / f"{split}.json"
    path.write_text(json.dumps({"images": infos, "annotations": anns, "categories": CATEGORIES}))
    return path, images, stuff


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """(dataset root, a `make train` checkpoint of the tiny experiment)."""
    tmp = tmp_path_factory.mktemp("own")
    root = tmp / "custom"
    for split, n, seed in (("train", 6, 1), ("val", 4, 2)):
        src, images, stuff = export(tmp, split, n, seed)
        convert_instances(src, images, root, split, semantic_dir=stuff, progress=False)
    pre = tmp / "pretrain"
    train(cfg_for(pre, "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2"))
    return root, pre / "out" / "checkpoints" / "last.ckpt"


FAST = ["trainer.max_steps=2", "trainer.val_check_interval=1000", "trainer.check_val_every_n_epoch=null",
        "data.num_workers=0", "data.batch_size=2", "trainer.enable_model_summary=false",
        "callbacks.progress.refresh_rate=0"]  # fmt: skip


def finetune_cfg(tmp: Path, root: Path, *overrides):
    return cfg_for(
        tmp,
        *FAST,
        "data=custom",
        f"paths.custom={root}",
        "model.train_vocabulary=dataset",
        *overrides,
        fast=False,
    )


def predict_cfg(tmp: Path, root: Path, ckpt: Path, out: Path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("predict", overrides=[
            f"ckpt_path={ckpt}", f"input={root / 'images' / 'val'}", f"output={out}", f"paths.root_dir={tmp}",
            f"paths.output_dir={tmp}/predict_run",
            f"dataset_json={root / 'annotations' / 'panoptic_val.json'}", "loader.num_workers=0", *overrides,
        ])  # fmt: skip


def test_convert_finetune_evaluate_predict(own, tmp_path, caplog):
    root, pretrained = own
    caplog.set_level(logging.INFO, logger="odise_pl")
    # fine-tune: trainable weights only, fresh optimiser / schedule / step; the report says so
    train(finetune_cfg(tmp_path, root, f"init_from={pretrained}", "trainer.max_steps=3"))
    assert (
        "init_from" in caplog.text
        and "fresh: optimiser" in caplog.text
        and "needs no new weights" in caplog.text
    )
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3  # counted from 0, not from the pre-training's step
    assert saved["odise_pl"]["vocabulary"] == [["apple"], ["banana"], ["table"], ["wall"]]
    # evaluate with its own vocabulary (the dataset's names)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", "datasets=[custom]", f"paths.custom={root}",
                                         f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/eval",
                                         "loader.num_workers=0"])  # fmt: skip
    results = evaluate(cfg)["custom val"]
    assert {"pq", "miou", "ap"} <= set(results)
    # predict the folder; predictions.json scores as it is, by ours and by the COCO panoptic API
    out = tmp_path / "pred"
    counts = predict(predict_cfg(tmp_path, root, ckpt, out))
    assert counts.pop("seconds") > 0 and counts == {"images": 4, "skipped": 0, "done": 4, "failed": 0}
    gt_json, gt_dir = root / "annotations" / "panoptic_val.json", root / "annotations" / "panoptic_val"
    ours = evaluate_files(gt_json, gt_dir, out / "predictions.json", out / "panoptic", workers=1)
    from panopticapi.evaluation import pq_compute

    with contextlib.redirect_stdout(io.StringIO()):
        ref = pq_compute(str(gt_json), str(out / "predictions.json"), str(gt_dir), str(out / "panoptic"))
    for group in ("All", "Things", "Stuff"):
        for m in ("pq", "sq", "rq"):
            assert ours[group][m] == pytest.approx(ref[group][m], abs=1e-9), (group, m)
    categories = json.loads((out / "predictions.json").read_text())["categories"]
    assert [(c["id"], c["isthing"]) for c in categories] == [(3, 1), (5, 1), (11, 0), (12, 0)]


def test_init_from_loads_the_weights_and_checks_before_building(own, tmp_path, monkeypatch):
    import odise_pl.train as train_module
    from odise_pl.checkpoints import read_checkpoint_file
    from odise_pl.train import _train

    root, pretrained = own
    loaded = {}

    def spy(cfg, resume=None, init=None):
        loaded["init"] = init
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "_train", spy)
    with pytest.raises(SystemExit):
        train(finetune_cfg(tmp_path, root, f"init_from={pretrained}"))
    assert loaded["init"].path == pretrained
    monkeypatch.setattr(train_module, "_train", _train)
    # another architecture: one line naming both values, before anything is built
    with pytest.raises(CheckpointError, match="num_queries: checkpoint 16, config 8. Fine-tune with"):
        train(
            finetune_cfg(
                tmp_path / "b", root, f"init_from={pretrained}", "model.net.transformer_decoder.num_queries=8"
            )
        )
    with pytest.raises(ConfigError, match="exclude each other"):
        train(finetune_cfg(tmp_path / "c", root, f"init_from={pretrained}", f"ckpt_path={pretrained}"))
    # the weights in the model are the file's
    net_state = read_checkpoint_file(pretrained).state
    built = {}

    def capture(cfg, resume=None, init=None):
        from odise_pl.checkpoints import load_trainable

        datamodule, module, trainer = train_module.build(cfg, resume)
        load_trainable(module.net, init)
        built.update(module.net.trainable_state_dict())
        return {}

    monkeypatch.setattr(train_module, "_train", capture)
    train(finetune_cfg(tmp_path / "d", root, f"init_from={pretrained}"))
    assert all(torch.equal(built[k], v) for k, v in net_state.items())


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_interrupted_predict_resumes_to_the_same_files(own, tmp_path, monkeypatch):
    from odise_pl.inference.predict_loop import FolderPrediction

    root, ckpt = own
    whole = tmp_path / "whole"
    predict(predict_cfg(tmp_path, root, ckpt, whole, "write.semantic=true"))
    part = tmp_path / "part"
    real = FolderPrediction._write
    calls = []

    def dies_after_two(self, it, pred):
        if len(calls) == 2:
            raise RuntimeError("killed")  # as a killed job: two images done, the third never written
        calls.append(it["stem"])
        real(self, it, pred)

    monkeypatch.setattr(FolderPrediction, "_write", dies_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        predict(predict_cfg(tmp_path, root, ckpt, part, "write.semantic=true"))
    monkeypatch.setattr(FolderPrediction, "_write", real)
    counts = predict(predict_cfg(tmp_path, root, ckpt, part, "write.semantic=true"))
    assert counts["skipped"] == 2 and counts["done"] == 4
    assert _files(part) == _files(whole)
    # an unreadable image: logged, counted, skipped; the others done; a rerun retries it
    broken = tmp_path / "with_broken"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in (root / "images" / "val").iterdir():
        (inputs / p.name).write_bytes(p.read_bytes())
    (inputs / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    counts = predict(predict_cfg(tmp_path, root, ckpt, broken, f"input={inputs}"))
    assert {k: counts[k] for k in ("images", "skipped", "done", "failed")} == {
        "images": 5,
        "skipped": 0,
        "done": 4,
        "failed": 1,
    }
    assert (broken / "errors" / "zz_broken.txt").is_file()
    assert predict(predict_cfg(tmp_path, root, ckpt, broken, f"input={inputs}"))["skipped"] == 4


@pytest.mark.slow
def test_two_process_predict_writes_the_files_of_one(own, tmp_path):
    """`python -m odise_pl.predict trainer=ddp_cpu trainer.devices=2`: each image done once, by one of
    the processes; the output folder byte for byte that of one process."""
    root, ckpt = own
    one = tmp_path / "one"
    predict(predict_cfg(tmp_path, root, ckpt, one, "write.semantic=true"))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "odise_pl.predict", f"ckpt_path={ckpt}", f"input={root / 'images' / 'val'}",
           f"output={two}", f"dataset_json={root / 'annotations' / 'panoptic_val.json'}", "write.semantic=true",
           "loader.num_workers=0", "trainer=ddp_cpu", "trainer.devices=2", f"paths.root_dir={tmp_path}",
           f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _files(two) == _files(one)


def test_inputs_are_a_folder_a_glob_or_a_list_file(tmp_path):
    from odise_pl.errors import OdiseError
    from odise_pl.inference.predict_loop import find_images, relative_stem

    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("a/x.jpg", "a/b/y.png", "a/notes.txt"):
        (tmp_path / rel).write_bytes(b"")
    base, found = find_images(str(tmp_path / "a"))
    assert [relative_stem(p, base) for p in found] == ["b/y", "x"]
    base, found = find_images(str(tmp_path / "a" / "*.jpg"))
    assert [relative_stem(p, base) for p in found] == ["x"]
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\na/b/y.png\n\na/x.jpg\n")
    base, found = find_images(str(listing))
    assert [relative_stem(p, base) for p in found] == ["a/b/y", "a/x"]
    with pytest.raises(OdiseError, match="no images found"):
        find_images(str(tmp_path / "a" / "*.gif"))
