"""Trainable-only checkpoints: load (Lightning ``.ckpt`` or ``.safetensors``) and export.

Frozen weights (SD, CLIP) never go into a checkpoint; they come from ``odise_pl.weights``.
Nothing here unpickles code: ``torch.load(weights_only=True)`` or safetensors only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file, save_file
from torch import nn

from odise_pl.errors import OdiseError
from odise_pl.weights import safe_torch_load


class CheckpointError(OdiseError, RuntimeError):
    """An unreadable or mismatching checkpoint; the message names the file."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with local writes that cannot leave a broken file behind.

    Why ours: Lightning's own save goes through an fsspec transaction whose temporary file lives in
    the system temp folder; when that is another filesystem, the final move is a copy onto the
    destination, and running out of space during it truncates ``last.ckpt``. Here the checkpoint is
    written to a temporary file *next to* its destination, flushed to disk, and renamed over it
    (atomic on POSIX): a failed write (disk full, quota, crash) leaves every earlier checkpoint intact.
    Remote paths (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        fs, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(local)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        except OSError as err:
            raise self._failed(target, err) from err
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            # torch's zip writer re-raises a failed write (ENOSPC) as a RuntimeError; either way the
            # cause is the write, not the trainer.
            if isinstance(err, Exception):
                raise self._failed(
                    target, err.__context__ if isinstance(err.__context__, OSError) else err
                ) from err
            raise

    @staticmethod
    def _failed(target: Path, err: BaseException) -> CheckpointError:
        return CheckpointError(
            f"could not write checkpoint {target} ({err}). Checkpoints are written to a temporary file and "
            f"renamed into place, so the earlier ones in {target.parent} are intact: free disk space, then "
            f"resume with ckpt_path={target.parent / 'last.ckpt'}"
        )


def read_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    """Trainable weights of the ODISE net (keys relative to it) from a .ckpt or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        ckpt = safe_torch_load(path)
    except Exception as err:  # truncated, not a checkpoint, or holding code objects
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state_dict")
    return {k[len("net.") :] if k.startswith("net.") else k: v for k, v in state.items()}


def load_trainable(net: nn.Module, path: str | Path) -> None:
    """Load trainable weights into ``net`` (an ODISE); every trainable weight must be present."""
    state = read_trainable(path)
    own = net.trainable_state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: {len(missing)} weights missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); it was written by another model configuration "
            "(check `experiment=` and the model overrides)"
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(
            f"{path}: shapes differ for {bad[:3]} ({[tuple(state[k].shape) for k in bad[:3]]} "
            f"vs {[tuple(own[k].shape) for k in bad[:3]]})"
        )
    net.load_state_dict(state, strict=False)


def export_safetensors(ckpt_path: str | Path, out: str | Path) -> Path:
    """A Lightning checkpoint -> one ``.safetensors`` file of the trainable weights (for inference)."""
    state = {k: v.contiguous() for k, v in read_trainable(ckpt_path).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m odise_pl.checkpoint export CKPT OUT.safetensors``."""
    p = argparse.ArgumentParser(description="Export a trainable-only checkpoint to safetensors.")
    p.add_argument("command", choices=["export"])
    p.add_argument("ckpt")
    p.add_argument("out")
    a = p.parse_args(argv)
    try:
        out = export_safetensors(a.ckpt, a.out)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
