"""Checkpoints, one home: reading (once per load), the model description a file carries and its
check as data, export to safetensors, the training hooks, and the authors' released checkpoints.

- :mod:`~odise_pl.checkpoints.trust`: what a stored config may contain (data, never code);
- :mod:`~odise_pl.checkpoints.description`: describe a run's model, rebuild a config from a file;
- :mod:`~odise_pl.checkpoints.files`: read ``.ckpt`` / ``.safetensors`` once, load into a model,
  write atomically;
- :mod:`~odise_pl.checkpoints.export`: ``python -m odise_pl.checkpoints export CKPT OUT.safetensors``;
- :mod:`~odise_pl.checkpoints.hooks`: the LightningModule's trainable-only save / load hooks;
- :mod:`~odise_pl.checkpoints.official`: the authors' detectron2 checkpoints -> ours.

Imports run one way (trust <- description, files <- export; hooks and official stand alone), so
the package has no import circle (``tests/test_checkpoint_trust.py`` checks it).
"""

from odise_pl.checkpoints.description import describe, resolve_from_checkpoint, safetensors_metadata
from odise_pl.checkpoints.files import (
    AtomicCheckpointIO,
    CheckpointFile,
    describe_mismatch,
    load_trainable,
    read_checkpoint,
    read_checkpoint_file,
)
from odise_pl.checkpoints.trust import UntrustedConfigError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointFile",
    "UntrustedConfigError",
    "describe",
    "describe_mismatch",
    "load_trainable",
    "read_checkpoint",
    "read_checkpoint_file",
    "resolve_from_checkpoint",
    "safetensors_metadata",
]
