"""Reading trainable-only checkpoints (Lightning ``.ckpt`` or ``.safetensors``), once per load.

:func:`read_checkpoint_file` opens a file once and returns its trainable tensors with its checked
description (:mod:`odise_pl.checkpoints.trust`); eval, the demos, the notebooks' loader and
training's resume check all go through it. Frozen weights (SD, CLIP) never go into a checkpoint;
they come from ``odise_pl.weights``. Nothing here unpickles code: ``torch.load(weights_only=True)``
or safetensors only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io import TorchCheckpointIO
from safetensors import safe_open
from torch import nn

from odise_pl.checkpoints.trust import KEY, check_description
from odise_pl.errors import CheckpointError
from odise_pl.fs import atomic_write
from odise_pl.weights import safe_torch_load


@dataclass
class CheckpointFile:
    """One checkpoint, read once.

    Attributes:
        path: the file.
        state: trainable tensors by name, relative to the ODISE net (``transformer_decoder...``).
        description: the checked model description, or None for files written without one.
        raw: a ``.ckpt``'s whole dict (optimiser, loops, RNG: what a resume needs); None for
            ``.safetensors``.
    """

    path: Path
    state: dict[str, torch.Tensor]
    description: dict | None = None
    raw: dict | None = field(default=None, repr=False)
    stat: tuple = field(default=(), repr=False)

    def shapes(self) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.state.items()}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with local writes that cannot leave a broken file behind.

    Why ours: Lightning's own save goes through an fsspec transaction whose temporary file lives in
    the system temp folder; when that is another filesystem, the final move is a copy onto the
    destination, and running out of space during it truncates ``last.ckpt``. Here the checkpoint is
    written to a temporary file *next to* its destination, flushed to disk, and renamed over it
    (atomic on POSIX): a failed write (disk full, quota, crash) leaves every earlier checkpoint intact.
    Remote paths (``s3://`` ...) keep Lightning's behaviour.

    ``preloaded``: the resume checkpoint training already read (and checked) before building the
    model; Lightning's own load of the same, unchanged file gets it instead of a second read.
    """

    def __init__(self, preloaded: CheckpointFile | None = None):
        super().__init__()
        self._preloaded = preloaded

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        fs, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(local), lambda f: torch.save(checkpoint, f), on_error=_write_failed)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Every checkpoint Lightning reads (resume, validate) with ``weights_only=True``, whatever
        the caller or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` asks: a checkpoint never runs code.
        """
        pre, self._preloaded = self._preloaded, None  # handed out once, then freed
        if pre is not None and pre.raw is not None and _stat(Path(path)) == pre.stat:
            return pre.raw
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


def _stat(path: Path) -> tuple:
    try:
        st = path.resolve().stat()
    except OSError:
        return ()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    import json

    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if text is None:
        return state, None
    try:
        return state, json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the {KEY!r} metadata is not JSON ({err})") from err


def read_checkpoint_file(path: str | Path, trust: bool = False) -> CheckpointFile:
    """A ``.ckpt`` or ``.safetensors`` file, opened once: its trainable tensors and its description,
    checked as data (:func:`~odise_pl.checkpoints.trust.check_description`; ``trust=True``, the
    user's explicit ``trust_checkpoint_config``, skips the allowlist). Any failure is one
    :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    stat = _stat(path)
    if path.suffix == ".safetensors" and path.is_file():
        state, desc = _read_safetensors(path)
        raw = None
    else:
        raw = read_checkpoint(path)
        state = raw.get("state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(
                f"{path} holds no state_dict of weights (keys: {sorted(raw)[:6]}); give a checkpoint written "
                "by `python -m odise_pl.train` (a .ckpt) or its export (.safetensors)"
            )
        state = {k[len("net.") :] if k.startswith("net.") else k: v for k, v in state.items()}
        desc = raw.get(KEY)
    if desc is not None:
        desc = check_description(desc, path, trust=trust)
    return CheckpointFile(path, state, desc, raw, stat)


def load_trainable(net: nn.Module, ckpt: CheckpointFile | str | Path) -> None:
    """Load trainable weights into ``net`` (an ODISE); every trainable weight must be present, with
    its shape and kind (a floating-point weight never comes from an integer tensor).
    """
    if not isinstance(ckpt, CheckpointFile):
        ckpt = read_checkpoint_file(ckpt)
    path, state = ckpt.path, ckpt.state
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
    kinds = [k for k in own if own[k].is_floating_point() != state[k].is_floating_point()]
    if kinds:
        k = kinds[0]
        raise CheckpointError(
            f"{path}: {k} is {state[k].dtype} in the file, the model's is {own[k].dtype} "
            f"({len(kinds)} such tensors); the file was not written by odise_pl's export or converter"
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
