"""Full-size smoke run (``make smoke-full``): caption_512 with random weights on synthetic data."""

import pytest

from odise_pl.weights import count_parameters

pytestmark = pytest.mark.slow

PAPER_TRAINABLE = 28.1e6


def caption_512(tmp_path) -> list[str]:
    """caption_512 at full size with random weights, on a 2-image synthetic set, one image a step."""
    return [
        "experiment=caption_512",
        "weights.mode=random",
        "data.batch_size=1",
        "data.global_batch_size=null",
        "data.num_workers=0",
        f"data.synthetic={{root: {tmp_path}/syn, num_train: 2, num_val: 1, seed: 0}}",
        f"data.train_dataset.root={tmp_path}/syn",
        "model.train_vocabulary=dataset",  # the synthetic categories are not COCO's
        "logger=csv",
    ]


def test_caption_512_two_steps_random_weights(tmp_path):
    from odise_pl.train import build

    from test_train import cfg_for

    cfg = cfg_for(
        tmp_path,
        *caption_512(tmp_path),
        "trainer.max_steps=2",
        "trainer.enable_model_summary=true",
        fast=False,
    )
    datamodule, module, trainer = build(cfg)
    trainable = count_parameters(module, trainable=True)
    print(f"trainable parameters: {trainable / 1e6:.2f}M (paper: 28.1M)")
    assert abs(trainable - PAPER_TRAINABLE) / PAPER_TRAINABLE < 0.01  # 28,066,755: tests/test_convert.py
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2


def test_caption_512_checkpoint_is_small_and_resumes(tmp_path):
    import glob
    import os

    from odise_pl.train import build

    from test_train import cfg_for

    common = [*caption_512(tmp_path), "callbacks.model_checkpoint.every_n_train_steps=1"]
    datamodule, module, trainer = build(cfg_for(tmp_path, *common, "trainer.max_steps=1", fast=False))
    trainer.fit(module, datamodule=datamodule)
    ckpt = sorted(glob.glob(f"{tmp_path}/out/checkpoints/last*.ckpt"))[-1]
    size = os.path.getsize(ckpt)
    print(f"full-size trainable-only checkpoint: {size / 1e6:.0f} MB")
    assert size < 500e6
    datamodule, module, trainer = build(cfg_for(tmp_path, *common, "trainer.max_steps=2", fast=False))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    assert trainer.global_step == 2
