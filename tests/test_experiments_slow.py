"""Every paper experiment config runs one training step on the synthetic data with `random` (full-size)
weights, as one Hydra multirun over `experiment=glob(*)` (slow: minutes per experiment on CPU)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_every_experiment_one_step(tmp_path):
    syn = tmp_path / "syn"
    cmd = [
        sys.executable,
        "-m",
        "odise_pl.train",
        "-m",
        "experiment=glob(*,exclude=tiny)",
        "weights.mode=random",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1000",
        "data.batch_size=1",
        "data.global_batch_size=null",
        "data.num_workers=0",
        f"data.synthetic={{root: {syn}, num_train: 2, num_val: 1, seed: 0}}",
        f"data.train_dataset.root={syn}",
        "model.train_vocabulary=dataset",  # the synthetic categories are not COCO's
        "logger=csv",
        "data.val_transform.short_edge=128",
        "data.val_transform.max_size=256",
        f"paths.root_dir={tmp_path}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("after training:") == 4  # caption/label x 512/1024 (tiny is tiny by definition)
