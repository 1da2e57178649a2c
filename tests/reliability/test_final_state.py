"""The end of a run loses nothing, and a stop says only what is true: the final step is on disk
(atomically, before validation) whatever the checkpoint interval; SIGTERM at any stage names the
file that holds the run's state, or says that none does."""

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from odise_pl.callbacks.preemption import Preempted
from odise_pl.train import preempted_message, train

from test_train import cfg_for


def _step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_the_final_step_is_saved_when_max_steps_is_not_a_multiple_of_the_interval(tmp_path, monkeypatch):
    def broken_validation(*a, **k):
        raise RuntimeError("validation crashed")

    # the save comes before anything else: even a crash right after training finds the final step
    monkeypatch.setattr(L.Trainer, "validate", broken_validation)
    with pytest.raises(RuntimeError, match="validation crashed"):
        train(cfg_for(tmp_path, "trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=2"))
    folder = tmp_path / "out" / "checkpoints"
    assert _step(folder / "last.ckpt") == 3 and _step(folder / "step_000002.ckpt") == 2
    assert not list(folder.glob("*.partial"))


def test_sigterm_during_validation_after_training_names_the_final_state(tmp_path, monkeypatch):
    def sigterm(*a, **k):
        raise SIGTERMException()

    monkeypatch.setattr(L.Trainer, "validate", sigterm)
    with pytest.raises(Preempted) as stop:
        train(cfg_for(tmp_path, "trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=2"))
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert stop.value.saved == last and _step(last) == 3
    assert preempted_message(stop.value) == f"stopped by SIGTERM; saved {last}: resume with ckpt_path={last}"


def test_sigterm_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    def sigterm(*a, **k):
        raise SIGTERMException()

    monkeypatch.setattr(L.Trainer, "validate", sigterm)
    with pytest.raises(Preempted) as stop:
        train(cfg_for(tmp_path, "validate_before_training=true"))
    assert stop.value.saved is None and stop.value.newest is None
    message = preempted_message(stop.value)
    assert "during validation before training, before any checkpoint was written" in message
    assert "saved" not in message
    assert not (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()


def test_sigterm_with_only_older_checkpoints_names_the_newest(tmp_path):
    older = tmp_path / "step_000002.ckpt"
    older.write_bytes(b"x")
    message = preempted_message(Preempted("validation before training", None, older))
    assert f"the newest checkpoint is {older}: resume with ckpt_path={older}" in message
    assert not message.startswith("stopped by SIGTERM; saved")
