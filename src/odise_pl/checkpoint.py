"""Trainable-only checkpoints: load (Lightning ``.ckpt`` or ``.safetensors``) and export.

Frozen weights (SD, CLIP) never go into a checkpoint; they come from ``odise_pl.weights``.
Nothing here unpickles code: ``torch.load(weights_only=True)`` or safetensors only.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file, save
from torch import nn

from odise_pl.checkpoint_config import KEY, read_description, safetensors_metadata
from odise_pl.errors import CheckpointError, OdiseError, say_error
from odise_pl.fs import atomic_write, check_writable_file
from odise_pl.logs import configure_cli, get_logger
from odise_pl.weights import safe_torch_load

log = get_logger(__name__)


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
        atomic_write(Path(local), lambda f: torch.save(checkpoint, f), on_error=_write_failed)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Every checkpoint Lightning reads (resume, validate) with ``weights_only=True``, whatever
        the caller or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` asks: a checkpoint never runs code.
        """
        return read_checkpoint(path, map_location)


def _write_failed(target: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"could not write checkpoint {target} ({err}). Checkpoints are written to a temporary file and "
        f"renamed into place, so the earlier ones in {target.parent} are intact: free disk space, then "
        f"resume with ckpt_path={target.parent / 'last.ckpt'}"
    )


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A Lightning checkpoint as a dict, loaded with ``weights_only=True``; any failure (missing,
    a directory, empty, truncated, not a checkpoint, holding code) is one :class:`CheckpointError`.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory; give the .ckpt file inside it (e.g. last.ckpt)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = safe_torch_load(path, map_location=map_location or "cpu")
    except Exception as err:  # truncated, empty, not a checkpoint, or holding code objects
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {first} (an incomplete copy? the previous "
            "step_*.ckpt files of a run are complete)"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def read_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    """Trainable weights of the ODISE net (keys relative to it) from a .ckpt or .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} holds no state_dict of weights (keys: {sorted(ckpt)[:6]}); give a checkpoint written "
            "by `python -m odise_pl.train` (a .ckpt) or its export (.safetensors)"
        )
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


# Trainable tensors whose shapes are config values: tensor -> the config key of each dimension.
_SHAPE_KEYS = {
    "transformer_decoder.query_feat.weight": (
        "model.net.transformer_decoder.num_queries",
        "model.net.transformer_decoder.hidden_dim",
    ),
    "transformer_decoder.ffn.0.linear1.weight": ("model.net.transformer_decoder.dim_feedforward", None),
    "pixel_decoder.mask_features.weight": (
        "model.net.pixel_decoder.mask_dim",
        "model.net.pixel_decoder.conv_dim",
    ),
    "pixel_decoder.layers.0.linear1.weight": ("model.net.pixel_decoder.dim_feedforward", None),
    "transformer_decoder.embed_head.1.layers.2.weight": ("model.net.transformer_decoder.embed_dim", None),
}
_LAYER_KEYS = {
    r"transformer_decoder\.cross_attn\.(\d+)\.": "model.net.transformer_decoder.num_layers",
    r"pixel_decoder\.layers\.(\d+)\.": "model.net.pixel_decoder.num_layers",
}


def describe_mismatch(ckpt: dict[str, tuple], model: dict[str, tuple]) -> list[str]:
    """Where a checkpoint's trainable tensors (name -> shape) differ from a model's, as config
    values where they are config values (``key: checkpoint A, config B``), else as tensors.
    """
    out = []
    kinds = [
        (
            "caption (objectness head: model.supervision=caption, experiment=caption_*)",
            "transformer_decoder.class_embed.weight",
        ),
        ("label (null embedding: model.supervision=label, experiment=label_*)", "classifier.null_embed"),
    ]
    ck = next((k for k, key in kinds if key in ckpt), None)
    mk = next((k for k, key in kinds if key in model), None)
    if ck != mk:
        out.append(f"model kind: checkpoint {ck}, config {mk}")
    for pattern, key in _LAYER_KEYS.items():
        count = [len({m.group(1) for k in d if (m := re.match(pattern, k))}) for d in (ckpt, model)]
        if count[0] != count[1]:
            out.append(f"{key}: checkpoint {count[0]}, config {count[1]}")
    for name, keys in _SHAPE_KEYS.items():
        if name in ckpt and name in model and ckpt[name] != model[name]:
            for key, a, b in zip(keys, ckpt[name], model[name]):
                if key and a != b and not any(line.startswith(key + ":") for line in out):
                    out.append(f"{key}: checkpoint {a}, config {b}")
    if not out:
        diff = [k for k in model if k in ckpt and tuple(ckpt[k]) != tuple(model[k])]
        missing = [k for k in model if k not in ckpt]
        extra = [k for k in ckpt if k not in model]
        out += [f"{k}: checkpoint {tuple(ckpt[k])}, config {tuple(model[k])}" for k in diff[:3]]
        out += [f"missing in the checkpoint: {', '.join(missing[:3])}"] if missing else []
        out += [f"not in this model: {', '.join(extra[:3])}"] if extra else []
    return out


def export_safetensors(ckpt_path: str | Path, out: str | Path) -> Path:
    """A Lightning checkpoint -> one ``.safetensors`` file of the trainable weights (for inference),
    written atomically; the checkpoint itself is never the output.
    """
    ckpt_path, out = Path(ckpt_path), Path(out)
    if out.exists() and (out.is_dir() or out.resolve() == ckpt_path.resolve() or out.samefile(ckpt_path)):
        what = "a directory" if out.is_dir() else "the checkpoint being exported"
        raise CheckpointError(
            f"the output {out} is {what}; give a new file name, e.g. {ckpt_path.with_suffix('.safetensors')}"
        )
    check_writable_file(out)
    state = {k: v.contiguous() for k, v in read_trainable(ckpt_path).items()}
    meta = safetensors_metadata(read_description(ckpt_path))
    atomic_write(out, lambda f: f.write(save(state, metadata=meta or None)))
    return out


class TrainableOnlyCheckpoints:
    """LightningModule hooks (a mixin of :class:`~odise_pl.lit_module.ODISELitModule`): a checkpoint
    holds the trainable weights only (1.5B frozen parameters are rebuilt from their sources), the RNG
    state (point sampling in the matcher and criterion draws from it: a resumed run continues
    exactly) and, once training set it, the model's description (:mod:`odise_pl.checkpoint_config`).
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
        # the file rebuilds its model alone (checkpoint_config.py)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m odise_pl.checkpoint export CKPT OUT.safetensors``."""
    p = argparse.ArgumentParser(description="Export a trainable-only checkpoint to safetensors.")
    p.add_argument("command", choices=["export"])
    p.add_argument("ckpt")
    p.add_argument("out")
    a = p.parse_args(argv)
    configure_cli()
    try:
        out = export_safetensors(a.ckpt, a.out)
    except OdiseError as err:
        say_error(str(err))
        return 2
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
