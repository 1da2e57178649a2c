"""Bad input everywhere a user hands us data: each case is built on the fly and must give an error
that names the file or key and the fix (the README's troubleshooting table lists the same cases).

Covered in other files: images of every mode / truncated / zero bytes (test_images.py), bad samples
during training (test_bad_samples.py), panoptic PNG vs JSON mismatches (../test_data.py), vocabularies
(../test_vocab.py), checkpoints of the wrong model / truncated (../test_eval.py), prediction files
(../test_panoptic_quality.py).
"""

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from PIL import Image

from odise_pl.config import check_config
from odise_pl.data.coco_panoptic import COCOPanopticDataset
from odise_pl.data.io import load_image
from odise_pl.data.nouns import SampleWords
from odise_pl.errors import ConfigError, DatasetError
from odise_pl.train import build

from test_train import cfg_for


@pytest.fixture()
def root(synthetic_root, tmp_path):
    dst = tmp_path / "syn"
    shutil.copytree(synthetic_root[0], dst)
    return dst


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def pan_json(root):
    return root / "annotations" / "panoptic_train2017.json"


# --- panoptic annotation JSON ---------------------------------------------------------------------

JSON_CASES = {
    "no annotations list": (lambda d: d.pop("annotations"), r"no 'annotations' list"),
    "annotation without segments_info": (
        lambda d: d["annotations"][1].pop("segments_info"),
        r"annotations\[1\] has no 'segments_info'",
    ),
    "image without file_name": (lambda d: d["images"][0].pop("file_name"), r"images\[0\] has no 'file_name'"),
    "segment without category_id": (
        lambda d: d["annotations"][0]["segments_info"][0].pop("category_id"),
        r"segments_info\[0\] of 000000000001.png has no 'category_id'",
    ),
    "duplicate image ids": (
        lambda d: d["images"].append(dict(d["images"][0])),
        r"image id \[1\] appears more than once",
    ),
    "duplicate category ids": (
        lambda d: d["categories"].append(dict(d["categories"][0], name="copy")),
        r"category id \[\d+\] appears more than once",
    ),
    "two annotations for one image": (
        lambda d: d["annotations"].append(dict(d["annotations"][0])),
        r"annotation for image_id \[1\] appears more than once",
    ),
    "duplicate segment ids": (
        lambda d: d["annotations"][0]["segments_info"].append(dict(d["annotations"][0]["segments_info"][0])),
        r"segment ids \[\d+\] appear more than once in the segments_info of 000000000001.png",
    ),
    "unknown category id": (
        lambda d: d["annotations"][0]["segments_info"][0].update(category_id=99999),
        r"category_id 99999, not in 'categories'",
    ),
    "unknown image id": (
        lambda d: d["annotations"][0].update(image_id=424242),
        r"names image_id 424242, which is not in its 'images' list",
    ),
    "no annotations at all": (lambda d: d.update(annotations=[]), r"'annotations' is empty"),
    "segments_info null": (
        lambda d: d["annotations"][0].update(segments_info=None),
        r"annotations\[0\].segments_info is null None, not a list",
    ),
    "a list as id": (
        lambda d: d["images"][0].update(id=[1]),
        r"images\[0\].id is a list \[1\], not an integer",
    ),
    "numeric file_name": (
        lambda d: d["annotations"][2].update(file_name=7),
        r"annotations\[2\].file_name is an integer 7, not a string",
    ),
    "segment id a string": (
        lambda d: d["annotations"][0]["segments_info"][1].update(id="3"),
        r"annotations\[0\].segments_info\[1\].id of .* is a string '3', not an integer",
    ),
    "categories an object": (
        lambda d: d.update(categories={"1": "x"}),
        r"'categories' is an object, not a list",
    ),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_panoptic_json(root, case):
    edit, message = JSON_CASES[case]
    edit_json(pan_json(root), edit)
    with pytest.raises(DatasetError, match=message) as err:
        COCOPanopticDataset(root=str(root), split="train")
    assert "panoptic_train2017.json" in str(err.value) and "re-download" in str(err.value)


def test_invalid_json_text(root):
    pan_json(root).write_text('{"images": [')
    with pytest.raises(DatasetError, match="panoptic_train2017.json is not valid JSON"):
        COCOPanopticDataset(root=str(root), split="train")


def test_json_that_is_not_utf8(root):
    pan_json(root).write_bytes(pan_json(root).read_bytes().replace(b'"name": "', b'"name": "\xff\xfe', 1))
    with pytest.raises(
        DatasetError, match=r"panoptic_train2017.json is not UTF-8 text \(byte \d+.*re-save it as UTF-8"
    ):
        COCOPanopticDataset(root=str(root), split="train")


def test_json_with_a_utf8_bom_is_read(root):
    pan_json(root).write_bytes(b"\xef\xbb\xbf" + pan_json(root).read_bytes())
    assert len(COCOPanopticDataset(root=str(root), split="train", captions=False)) > 0


def test_captions_file_that_is_a_list(root):
    (root / "annotations" / "captions_train2017.json").write_text("[]")
    with pytest.raises(
        DatasetError,
        match=r"captions_train2017.json: expected an object with an 'annotations' list.*got a list",
    ):
        COCOPanopticDataset(root=str(root), split="train")


def test_empty_validation_set_stops_evaluation_with_the_file(root, tmp_path):
    edit_json(root / "annotations" / "panoptic_val2017.json", lambda d: d.update(annotations=[]))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "odise_pl.eval",
            f"paths.root_dir={tmp_path}",
            f"datasets.synthetic.dataset.root={root}",
            "weights.mode=tiny",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "panoptic_val2017.json: 'annotations' is empty" in res.stderr, res.stderr[
        -2000:
    ]
    assert "Traceback" not in res.stderr


def test_segment_listed_but_absent_from_png_is_dropped(root, synthetic_root):
    # Not an error: COCO itself has such entries; the item simply has no mask for it.
    def add_ghost(d):
        seg = dict(d["annotations"][0]["segments_info"][0], id=123456)
        d["annotations"][0]["segments_info"].append(seg)

    edit_json(pan_json(root), add_ghost)
    ds = COCOPanopticDataset(root=str(root), split="train", captions=False)
    clean = COCOPanopticDataset(root=str(synthetic_root[0]), split="train", captions=False)
    assert len(ds.items[0][1]["segments_info"]) == len(clean.items[0][1]["segments_info"]) + 1
    assert ds[0]["labels"].tolist() == clean[0]["labels"].tolist()


# --- captions --------------------------------------------------------------------------------------


def test_caption_entry_without_caption(root):
    edit_json(root / "annotations" / "captions_train2017.json", lambda d: d["annotations"][0].pop("caption"))
    with pytest.raises(DatasetError, match=r"captions_train2017.json: annotations\[0\] needs 'image_id'"):
        COCOPanopticDataset(root=str(root), split="train")


@pytest.mark.parametrize("captions", [[], ["", "   "]])
def test_image_without_usable_caption(captions):
    with pytest.raises(DatasetError, match=r"x.jpg has no \(non-empty\) caption.*on_bad_sample=skip"):
        SampleWords(4)({"captions": captions, "file_name": "x.jpg"})


def test_caption_file_without_the_image(root, tmp_path):
    caps = tmp_path / "blip.json"
    caps.write_text(json.dumps({"elsewhere.jpg": "a cat"}))
    ds = COCOPanopticDataset(root=str(root), split="train", caption_source=str(caps))
    with pytest.raises(DatasetError, match=r"blip.json has no caption for 000000000001.jpg"):
        ds[0]


# --- images ----------------------------------------------------------------------------------------


def test_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(path)
    monkeypatch.setenv("ODISE_MAX_IMAGE_PIXELS", "100000")  # 0.1 MPixels; the image has 0.12
    with pytest.raises(DatasetError, match=r"big.png is 400x300.*ODISE_MAX_IMAGE_PIXELS"):
        load_image(path)
    monkeypatch.setenv("ODISE_MAX_IMAGE_PIXELS", "0")  # no limit: Pillow's own guard is off too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(path).shape == (300, 400, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_huge_panoptic_png_is_refused_before_decoding(root, monkeypatch):
    # a panoptic PNG of 30000 x 30000 compresses to a few MB and would take 3.6 GB to decode: the
    # header alone decides, in training, evaluation and the PQ command (all read through read_ids)
    import zlib

    from odise_pl.data.io import read_ids

    png = root / "annotations" / "panoptic_train2017" / "000000000001.png"
    side = 30000
    row = b"\x00" + b"\x00" * (3 * side)
    raw = zlib.compress(row * 64)  # a valid stream for 64 rows is enough: the header says 30000

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    with pytest.raises(
        DatasetError,
        match=r"panoptic PNG .*000000000001.png is 30000x30000 = 900 MPixels.*ODISE_MAX_IMAGE_PIXELS",
    ):
        read_ids(png)
    ds = COCOPanopticDataset(root=str(root), split="train", captions=False)
    with pytest.raises(DatasetError, match="30000x30000"):
        ds[0]


def test_corrupt_panoptic_png(root):
    from odise_pl.data.io import read_ids

    png = root / "annotations" / "panoptic_train2017" / "000000000001.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"cannot decode panoptic PNG .*000000000001.png"):
        read_ids(png)


# --- configs ---------------------------------------------------------------------------------------

CONFIG_CASES = {
    "trainer.max_steps=abc": r"trainer.max_steps='abc' \(str\) but lightning.Trainer expects int",
    "data.batch_size=2.5": r"data.batch_size=2.5 \(float\) but .*ODISEDataModule expects int",
    "data.on_bad_sample=ignore": r"data.on_bad_sample='ignore'.*Literal\['raise', 'skip'\]",
    "model.supervision=captions": r"model.supervision='captions'.*Literal\['label', 'caption'\]",
    "model.optimizer.lr=fast": r"model.optimizer.lr='fast'.*AdamW expects float",
    "weights.mode=big": r"model.net.backbone.unet.mode='big'.*Literal\['pretrained', 'random', 'tiny', 'meta'\]",
    "model.net.pixel_decoder.deform_attn_impl=cuda": r"deform_attn_impl='cuda'.*Literal\['auto', 'gather', 'grid_sample'\]",
}


@pytest.mark.parametrize("override", list(CONFIG_CASES))
def test_config_value_of_the_wrong_type(tmp_path, override):
    with pytest.raises(ConfigError, match=CONFIG_CASES[override]):
        check_config(cfg_for(tmp_path, override))


RANGE_CASES = {
    "data.batch_size=0": r"data.batch_size=0 is outside the allowed range >= 1",
    "data.batch_size=-3": r"data.batch_size=-3 is outside the allowed range >= 1",
    "data.num_workers=-1": r"data.num_workers=-1 is outside the allowed range >= 0",
    "model.optimizer.lr=-1e-4": r"model.optimizer.lr=-0.0001 is outside the allowed range > 0",
    "data.train_transform.size=0": r"data.train_transform.size=0 is outside the allowed range >= 1",
    "model.net.transformer_decoder.num_queries=0": r"num_queries=0 is outside the allowed range >= 1",
    "trainer.val_check_interval=0": r"trainer.val_check_interval=0 is outside the allowed range > 0",
    "model.predictor.alpha=1.5": r"model.predictor.alpha=1.5 is outside the allowed range \[0, 1\]",
}


@pytest.mark.parametrize("override", list(RANGE_CASES))
def test_config_value_out_of_range(tmp_path, override):
    with pytest.raises(ConfigError, match=RANGE_CASES[override]):
        check_config(cfg_for(tmp_path, override))


def test_every_shipped_config_passes_the_check(tmp_path):
    for override in (
        "experiment=caption_512",
        "experiment=label_1024",
        "trainer=gpu",
        "trainer=ddp",
        "logger=wandb",
    ):
        check_config(cfg_for(tmp_path, override, fast=False))


def test_unknown_key(tmp_path):
    with pytest.raises(ConfigCompositionException, match="data.batch_sizee"):
        cfg_for(tmp_path, "data.batch_sizee=4")


def test_missing_dataset_path(tmp_path):
    datamodule, _, _ = build(
        cfg_for(tmp_path, "data.synthetic=null", f"data.train_dataset.root={tmp_path}/nope")
    )
    with pytest.raises(DatasetError, match=r"dataset root not found: .*nope.*odise_pl.data.synthetic"):
        datamodule.setup("fit")


def test_cli_reports_one_line_and_exits_2(tmp_path):
    """The commands print ``error: ...`` (no traceback) and exit with status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "odise_pl.train", "trainer.max_steps=abc", f"paths.root_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        "error: config values of the wrong type" in proc.stderr and "trainer.max_steps='abc'" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
