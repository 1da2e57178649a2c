"""Training progress in optimiser steps: a bar of ``step / max_steps`` with an ETA, and a log line
every ``log_every`` steps for the run's log file (a SLURM job's output has no terminal to redraw).

Lightning's bar counts the batches of an epoch; training here is one infinite stream measured in
steps, with gradient accumulation (several batches per step) and resumption (the count starts
at the checkpoint's step), so the bar is driven by the trainer's global step instead.
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar

from odise_pl.log_setup import get_logger

log = get_logger(__name__)


def format_duration(seconds: float) -> str:
    """``1d 02:03:04`` / ``02:03:04`` / ``03:04``."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    clock = f"{h:02d}:{m:02d}:{s:02d}" if h or days else f"{m:02d}:{s:02d}"
    return f"{days}d {clock}" if days else clock


class StepProgressBar(TQDMProgressBar):
    """Args:
    refresh_rate: redraw the bar every N batches (0 disables the bar; the log lines stay).
    log_every: write ``step S/T (P%) R s/step ETA E loss L`` to the log every N steps (0: never).
    """

    def __init__(self, refresh_rate: int = 10, log_every: int = 100, **kwargs):
        super().__init__(refresh_rate=max(refresh_rate, 1), **kwargs)
        self._bar_enabled = refresh_rate > 0
        if not self._bar_enabled:
            self.disable()
        self.log_every = log_every
        self._start: tuple[float, int] | None = None
        self._logged = -1

    @property
    def max_steps(self) -> int | None:
        steps = self.trainer.max_steps
        return steps if steps and steps > 0 else None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_epoch_start(self, trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        if self._bar_enabled and bar is not None:
            bar.reset(total=self.max_steps)
            # The rate and ETA count this session's steps only (a resumed run starts at its step).
            bar.initial = bar.n = trainer.global_step
            bar.set_description("step")
            bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        bar = self.train_progress_bar
        if self._bar_enabled and bar is not None and not bar.disable and step != bar.n:
            if step % self.refresh_rate == 0 or step == self.max_steps:
                bar.n = step
                bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)
        if self.log_every and step % self.log_every == 0 and step != self._logged and step > 0:
            self._logged = step
            log.info("%s", self.status_line(step, trainer.callback_metrics.get("train/loss")))

    def status_line(self, step: int, loss=None) -> str:
        """``step 500/92188 (0.5%)  1.21 s/step  ETA 1d 06:47:12  loss 12.3``."""
        total = self.max_steps
        parts = [f"step {step}/{total} ({100 * step / total:.1f}%)" if total else f"step {step}"]
        if self._start is not None and step > self._start[1]:
            per_step = (time.monotonic() - self._start[0]) / (step - self._start[1])
            parts.append(f"{per_step:.2f} s/step")
            if total:
                parts.append(f"ETA {format_duration(per_step * (total - step))}")
        if loss is not None:
            parts.append(f"loss {float(loss):.3g}")
        return "  ".join(parts)
