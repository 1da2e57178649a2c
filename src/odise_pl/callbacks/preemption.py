"""The run's state on disk: at the end of training and when the run is pre-empted.

:class:`SaveFinalState`: when training ends, ``last.ckpt`` holds the final step, atomically, before
anything else runs (validation, tests, a crash in a later hook). Lightning's periodic checkpoints
alone leave it at the last multiple of the interval: with the paper's settings step 90,000 of
92,188, while the "after training" metrics would describe weights on no disk.

:class:`SaveOnPreemption`: SIGTERM (how SLURM, Kubernetes and most schedulers stop a job) saves
``last.ckpt``.

Lightning turns SIGTERM into a ``SIGTERMException`` (a ``SystemExit`` with status 0) at the next
step boundary, on every process, and saves nothing. This callback writes ``last.ckpt`` at that
point, on every process together (the save is collective under DDP) and atomically (the
checkpoint IO renames a finished file into place); the entry point then exits with status 143
(128 + SIGTERM), so the scheduler sees the job did not finish. Resuming from the file continues
the run exactly (``tests/reliability/test_kill_resume.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class Preempted(Exception):
    """A run stopped by SIGTERM, with what is on disk: ``saved`` (written for this stop, or the
    final state saved before the stage that was interrupted) or else ``newest`` (an earlier
    checkpoint), and the ``stage`` it was stopped in.
    """

    def __init__(self, stage: str, saved: Path | None, newest: Path | None):
        super().__init__(f"stopped by SIGTERM during {stage}")
        self.stage, self.saved, self.newest = stage, saved, newest


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written ``*.ckpt`` in ``folder`` (None if there is none)."""
    found = [p for p in Path(folder).glob("*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


class SaveFinalState(L.Callback):
    """Save ``<checkpoint dir>/last.ckpt`` at the end of training unless it already holds the final
    step. Put first among the callbacks, so that nothing runs before the save.
    """

    def __init__(self):
        self.saved: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or trainer.global_step == 0:
            return
        ckpt = trainer.checkpoint_callback
        path = SaveOnPreemption.checkpoint_path(trainer)
        done = getattr(ckpt, "_last_global_step_saved", None) == trainer.global_step
        if not (done and getattr(ckpt, "save_last", False) and path.is_file()):
            trainer.save_checkpoint(path, weights_only=False)  # full state; collective under DDP; atomic
            if trainer.is_global_zero:
                log.info("saved the final state (step %d) to %s", trainer.global_step, path)
        self.saved = path


class SaveOnPreemption(L.Callback):
    """Save ``<checkpoint dir>/last.ckpt`` when the run is stopped by SIGTERM."""

    def __init__(self):
        self.saved: Path | None = None

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        folder = (
            Path(ckpt.dirpath)
            if ckpt is not None and ckpt.dirpath
            else Path(trainer.default_root_dir) / "checkpoints"
        )
        return folder / "last.ckpt"

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = path
        if trainer.is_global_zero:
            log.warning("SIGTERM: saved %s at step %d", path, trainer.global_step)
