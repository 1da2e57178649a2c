"""A NaN / inf loss skips its step and is counted; too many in a row stop training with a clear message."""

import pytest
import torch

from odise_pl.callbacks.training_guards import NonFiniteLossMonitor
from odise_pl.train import build

from test_train import cfg_for


def test_isolated_nan_is_skipped_and_training_goes_on(tmp_path):
    datamodule, module, trainer = build(cfg_for(tmp_path, "trainer.max_steps=4"))
    original = module.loss.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        losses = original(*args, **kwargs)
        if calls["n"] == 2:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    module.loss.forward = flaky
    with pytest.warns(UserWarning, match="non-finite loss terms \\['loss_mask'\\]"):
        trainer.fit(module, datamodule=datamodule)
    monitor = next(c for c in trainer.callbacks if isinstance(c, NonFiniteLossMonitor))
    assert monitor.total == 1 and monitor.in_a_row == 0 and trainer.global_step == 4
    assert all(torch.isfinite(v).all() for v in module.net.trainable_state_dict().values())


def test_too_many_in_a_row_stop_with_a_message(tmp_path):
    datamodule, module, trainer = build(
        cfg_for(
            tmp_path,
            "trainer.max_steps=10",
            "model.criterion.mask_weight=nan",
            "callbacks.nonfinite.max_in_a_row=3",
        )
    )
    before = {k: v.clone() for k, v in module.net.trainable_state_dict().items()}
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row.*model.optimizer.lr"):
        with pytest.warns(UserWarning):
            trainer.fit(module, datamodule=datamodule)
    # Skipped steps change nothing (Lightning still counts them: no gradients, no update).
    after = module.net.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
