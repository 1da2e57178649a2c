"""A checkpoint write that fails half-way (disk full, simulated at the file layer) leaves every
earlier checkpoint intact and loadable, leaves no partial file, says what happened, and the run
resumes from the last complete checkpoint."""

import errno
import os

import pytest
import torch

from odise_pl.errors import CheckpointError
from odise_pl.train import train

from test_train import cfg_for


class DiskFull:
    """A file object that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def overrides(*extra):
    return ["trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2", *extra]


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_fdopen, opened = os.fdopen, []

    def fdopen(fd, mode="r", *args, **kw):
        f = real_fdopen(fd, mode, *args, **kw)
        if "w" in mode:
            opened.append(fd)
            if len(opened) > 2:  # step 2 and its last.ckpt succeed; the step-4 write runs out of space
                return DiskFull(f, room=4096)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(
        CheckpointError, match=r"step_000004\.ckpt.*No space left.*earlier ones.*intact.*last\.ckpt"
    ):
        train(cfg_for(tmp_path, *overrides()))
    monkeypatch.undo()

    ckdir = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["last.ckpt", "step_000002.ckpt"]  # no partial file
    for name in ("last.ckpt", "step_000002.ckpt"):
        ckpt = torch.load(ckdir / name, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 2

    # Space freed: the run resumes from last.ckpt and finishes.
    metrics = train(cfg_for(tmp_path, *overrides(f"ckpt_path={ckdir / 'last.ckpt'}")))
    assert "val/pq" in metrics
    assert torch.load(ckdir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6
