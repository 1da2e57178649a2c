"""The official optimiser set-up: detectron2's parameter groups and learning-rate schedule.

Written here rather than imported: detectron2 is not a dependency (it needs a compiled build), and
both pieces are a few lines whose exact behaviour the tests pin down against the official numbers
(``shared/parity/keys_*_full.json`` lists every tensor's weight decay).
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

# detectron2's get_default_optimizer_params: parameters of these modules are "norm" parameters.
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def weight_decay_of(
    module: nn.Module, weight_decay: float, weight_decay_norm: float | None, weight_decay_bias: float | None
) -> dict[str, float]:
    """Trainable parameter name -> its weight decay.

    PARITY with detectron2's ``get_default_optimizer_params(weight_decay_norm=0, weight_decay_bias=0)``
    as the official training builds its AdamW: a parameter of a normalisation layer gets
    ``weight_decay_norm``; a parameter named exactly ``bias`` gets ``weight_decay_bias`` (so
    ``nn.MultiheadAttention``'s ``in_proj_bias`` keeps the full decay); everything else (embeddings,
    the temperature, the captioner's gates) ``weight_decay``. ``None``: the full decay.
    """
    out: dict[str, float] = {}
    seen: set[int] = set()
    for module_name, mod in module.named_modules():
        for param_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            wd = weight_decay
            if isinstance(mod, NORM_TYPES) and weight_decay_norm is not None:
                wd = weight_decay_norm
            if param_name == "bias" and weight_decay_bias is not None:
                wd = weight_decay_bias
            out[f"{module_name}.{param_name}" if module_name else param_name] = wd
    return out


def param_groups(
    module: nn.Module, weight_decay_norm: float | None = 0.0, weight_decay_bias: float | None = 0.0
) -> list[dict]:
    """Trainable parameters of ``module`` in groups for the optimiser: one without a ``weight_decay``
    entry (the optimiser's own applies) and one per other decay (see :func:`weight_decay_of`).
    """
    full = object()  # stands for the optimiser's weight decay
    decay = weight_decay_of(module, full, weight_decay_norm, weight_decay_bias)  # type: ignore[arg-type]
    params = dict(module.named_parameters())
    groups: dict = {}
    for name, wd in decay.items():
        groups.setdefault(wd, []).append(params[name])
    return [{"params": ps} if wd is full else {"params": ps, "weight_decay": wd} for wd, ps in groups.items()]


class WarmupMultiStepLR(torch.optim.lr_scheduler.LambdaLR):
    """The official learning-rate schedule, stepped per optimiser step (the config's ``_partial_``
    scheduler).

    PARITY with ``WarmupParamScheduler(MultiStepParamScheduler(values, milestones, num_updates),
    warmup_length, warmup_factor)`` under detectron2's ``LRMultiplier``: the schedule is written for
    ``num_updates`` iterations and applied as fractions of the run, ``where = k / max_steps``. So
    with the official numbers (milestones 163889 and 177546 of 184375, warm-up 500 of 184375, from
    factor 0.067) a 92,188-step run warms up linearly over its first 250 steps and decays x0.1 at
    steps 81,945 and 88,774.

    Only the step count is checkpointed: a resumed run's schedule comes from its own config (a
    longer ``max_steps`` stretches it, as in detectron2).

    Args:
        optimizer: the optimiser.
        max_steps: optimiser steps of this run (``trainer.max_steps``).
        milestones, num_updates: where the values change, in the schedule's own iterations.
        values: the multiplier before the first milestone, after it, ... (len(milestones) + 1).
        warmup_length: warm-up iterations, in the schedule's own iterations.
        warmup_factor: the multiplier warm-up starts from.
    """

    EPS = 1e-6  # fvcore's WHERE_EPSILON
    _CONFIG = ("max_steps", "num_updates", "milestones", "values", "warmup", "warmup_factor")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_steps: int,
        milestones: list[int] | tuple[int, ...] = (163889, 177546),
        num_updates: int = 184375,
        values: list[float] | tuple[float, ...] = (1.0, 0.1, 0.01),
        warmup_length: float = 500,
        warmup_factor: float = 0.067,
    ):
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        if len(values) != len(milestones) + 1:
            raise ValueError(
                f"{len(milestones)} milestones need {len(milestones) + 1} values, got {list(values)}"
            )
        if not 0 <= warmup_length < num_updates:
            raise ValueError(f"warmup_length must lie in [0, num_updates={num_updates}), got {warmup_length}")
        self.max_steps, self.num_updates = max_steps, num_updates
        self.milestones, self.values = list(milestones), list(values)
        self.warmup = warmup_length / num_updates
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, lambda step: self.multiplier(step))

    def _steps(self, where: float) -> float:
        return self.values[bisect.bisect_right(self.milestones, int((where + self.EPS) * self.num_updates))]

    def multiplier(self, step: int) -> float:
        """The learning-rate multiplier of optimiser step ``step`` (0-based)."""
        where = min(step / self.max_steps, 1.0)
        if where + self.EPS <= self.warmup:
            start, end = self.warmup_factor * self._steps(0.0), self._steps(self.warmup)
            alpha = where / self.warmup
            return end * alpha + start * (1 - alpha)
        return self._steps(where)

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k not in self._CONFIG}
