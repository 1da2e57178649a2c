"""Trainable-only checkpoints: the LightningModule hooks that write and check them."""

from __future__ import annotations

import random

import torch

from odise_pl.checkpoints.trust import KEY
from odise_pl.errors import CheckpointError


class TrainableOnlyCheckpoints:
    """LightningModule hooks (a mixin of :class:`~odise_pl.lit_module.ODISELitModule`): a checkpoint
    holds the trainable weights only (1.5B frozen parameters are rebuilt from their sources), the RNG
    state (point sampling in the matcher and criterion draws from it: a resumed run continues
    exactly) and, once training set it, the model's description (:mod:`odise_pl.checkpoints.description`).
    Loading requires every trainable weight of the module.
    """

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"net.{p}" for p in self.net.frozen_prefixes())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = self._frozen_prefixes()
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)
        }
        # Point sampling in the matcher / criterion draws from these: a resumed run continues exactly.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}
        # the file rebuilds its model alone (checkpoints/description.py)
        if getattr(self, "description", None) is not None:
            checkpoint[KEY] = {**self.description, "vocabulary": self.vocabulary, "isthing": self.isthing}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        frozen = self._frozen_prefixes()
        missing = sorted(
            {k for k in self.state_dict() if not k.startswith(frozen)} - set(checkpoint["state_dict"])
        )
        if missing:
            raise CheckpointError(
                f"checkpoint lacks {len(missing)} trained weights of this model (e.g. {missing[:3]}); "
                "it was written by a different model configuration"
            )
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(rng["python"])
