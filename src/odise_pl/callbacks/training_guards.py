"""Guards of a long run: skipped non-finite steps are counted and stop the run when they repeat;
bad samples skipped by the data pipeline are reported; a resumed run uses its own optimiser settings.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch

from odise_pl.log_setup import get_logger

log = get_logger(__name__)


class NonFiniteLossMonitor(L.Callback):
    """Counts the steps the LightningModule skipped for a NaN / inf loss (ours says so in
    ``step_skipped``: its gradients are dropped, no update; another module's ``training_step``
    returns None) and stops training after ``max_in_a_row`` in a row.

    The module names the offending terms in ``nonfinite_terms``; every skip is logged as
    ``train/nonfinite_steps`` and warned about.
    """

    def __init__(self, max_in_a_row: int = 5):
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be at least 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = self.total = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        skipped = getattr(pl_module, "step_skipped", None)
        if (
            skipped is None
        ):  # another module: Lightning hands over {} (or None) when training_step returned None
            skipped = outputs is None or (isinstance(outputs, dict) and outputs.get("loss") is None)
        if not skipped:  # a step taken, or a micro-batch kept for the step's last one
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        bad = getattr(pl_module, "nonfinite_terms", [])[:6]
        warnings.warn(
            f"step {trainer.global_step}: non-finite loss terms {bad}; the step is skipped", stacklevel=2
        )
        pl_module.log("train/nonfinite_steps", float(self.total), batch_size=len(batch["images"]))
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite losses in a row (terms {bad}) at step {trainer.global_step}: "
                "training stopped. Resume from the last checkpoint with a lower learning rate "
                "(model.optimizer.lr) or check the data; callbacks.nonfinite.max_in_a_row sets the limit."
            )


class BadSampleReport(L.Callback):
    """Counts the samples the data pipeline skipped (``data.on_bad_sample=skip``; each batch says
    how many in ``bad_samples``) and reports the total over all processes when training ends.
    """

    def __init__(self):
        self.count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.count += int(batch.get("bad_samples", 0))

    def on_train_end(self, trainer, pl_module) -> None:
        total = torch.tensor(float(self.count))
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total.to(pl_module.device), reduce_op="sum").cpu()
        if trainer.is_global_zero and total > 0:
            log.warning(
                "skipped %d bad training samples (data.on_bad_sample=skip); see the warnings above",
                int(total),
            )


class ConfiguredOptimizerOnResume(L.Callback):
    """A resumed run trains with its own config's learning rate and weight decay: the optimiser and
    scheduler state restored from the checkpoint would otherwise keep the checkpoint's (a lower
    ``model.optimizer.lr`` to get past a divergence would be silently ignored).

    Reads the values the module's ``configure_optimizers`` recorded in ``configured_optimizer``
    (per parameter group: initial learning rate, weight decay) before the state was restored.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        configured = getattr(pl_module, "configured_optimizer", None)
        if not configured or not trainer.optimizers:
            return
        opt, sched = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
        changed = set()
        for i, (group, (lr, wd)) in enumerate(zip(opt.param_groups, configured)):
            if group["initial_lr"] != lr:
                changed.add(f"model.optimizer.lr {group['initial_lr']:g} -> {lr:g}")
                group["initial_lr"] = sched.base_lrs[i] = lr
                group["lr"] = lr * sched.lr_lambdas[i](sched.last_epoch)
            if group["weight_decay"] != wd:
                changed.add(f"weight decay {group['weight_decay']:g} -> {wd:g}")
                group["weight_decay"] = wd
        if changed and trainer.is_global_zero:
            log.info(
                "resumed with this run's optimiser settings: %s (the checkpoint's differ)",
                ", ".join(sorted(changed)),
            )
