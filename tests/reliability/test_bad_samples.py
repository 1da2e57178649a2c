"""data.on_bad_sample: raise names the file and the fix; skip trains on and reports the count."""

import logging
import shutil

import pytest

from odise_pl.errors import DatasetError
from odise_pl.train import build, train

from test_train import cfg_for


@pytest.fixture()
def corrupt_root(synthetic_root, tmp_path):
    root, _ = synthetic_root
    dst = tmp_path / "syn"
    shutil.copytree(root, dst)
    (dst / "train2017" / "000000000002.jpg").write_bytes(b"\x00" * 10)  # zero-ish bytes: not an image
    return dst


def overrides(root):
    return [f"data.synthetic.root={root}", f"data.train_dataset.root={root}", "trainer.max_steps=6"]


def test_raise_names_the_file_and_the_fix(corrupt_root, tmp_path):
    datamodule, module, trainer = build(cfg_for(tmp_path, *overrides(corrupt_root)))
    with pytest.raises(DatasetError, match=r"000000000002\.jpg.*on_bad_sample=skip"):
        trainer.fit(module, datamodule=datamodule)


def test_skip_counts_and_reports(corrupt_root, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="odise_pl")
    with pytest.warns(UserWarning, match="skipping a bad sample"):
        train(cfg_for(tmp_path, *overrides(corrupt_root), "data.on_bad_sample=skip"))
    out = caplog.text
    assert "skipped" in out and "bad training samples" in out
