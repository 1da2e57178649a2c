"""Pre-emption: SIGTERM (how SLURM, Kubernetes and most schedulers stop a job) saves ``last.ckpt``.

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
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            log.warning("SIGTERM: saved %s at step %d", path, trainer.global_step)
