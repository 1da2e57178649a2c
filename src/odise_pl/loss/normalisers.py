"""What the loss terms of one optimiser step are divided by, counted over the whole global batch.

The global batch of a step is split across processes (DDP) and micro-batches (gradient
accumulation). Each process sums its micro-batches' terms and DDP averages the processes'
gradients, so each process divides by ``global count / world``: the averaged gradient is then the
gradient of the global-batch mean, however the batch is split (tested in float64:
``tests/test_global_batch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

CLASS_NORMALISERS = ("micro_batch", "global")


def at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision values (autocast) in float32 for the losses; float32 and float64 kept as they are
    (the float64 equivalence tests need the losses computed in float64).
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def world_size() -> int:
    """Processes of the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class Normalisers:
    """Divisors of one process's summed loss terms.

    Attributes:
        num_masks: target masks of the global batch / world, at least 1 (PARITY: Mask2Former's
            ``clamp(num_masks / world, min=1)``, whose batch is the global one when nothing accumulates).
        class_weight: the classification cross-entropy's summed weights (``no_object_weight`` for
            unmatched queries, 1 for matched ones) over the global batch / world; ``None``: each
            micro-batch's own weighted mean, divided by ``micro_batches``.
        micro_batches: micro-batches this process sums over.
    """

    num_masks: float
    class_weight: float | None = None
    micro_batches: int = 1


def count_normalisers(
    target_groups: list[list[dict]],
    *,
    num_queries: int,
    no_object_weight: float,
    class_normaliser: Literal["micro_batch", "global"] = "micro_batch",
    device: torch.device | str = "cpu",
) -> Normalisers:
    """Normalisers of one step from the targets of this process's micro-batches (one all-reduce).

    Counted from the targets alone, before any forward pass: Hungarian matching gives each image
    ``min(num_queries, targets)`` matched queries, so the cross-entropy's weight sum is known.
    """
    if class_normaliser not in CLASS_NORMALISERS:
        raise ValueError(f"class_normaliser must be one of {CLASS_NORMALISERS}, got {class_normaliser!r}")
    masks = weights = 0.0
    for targets in target_groups:
        for t in targets:
            n = len(t["masks"])
            matched = min(num_queries, n)
            masks += n
            weights += matched + no_object_weight * (num_queries - matched)
    counts = torch.tensor([masks, weights], dtype=torch.float64, device=device)
    world = world_size()
    if world > 1:
        dist.all_reduce(counts)
    counts = (counts / world).tolist()
    return Normalisers(
        num_masks=max(counts[0], 1.0),
        class_weight=counts[1] if class_normaliser == "global" else None,
        micro_batches=len(target_groups),
    )
