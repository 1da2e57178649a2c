"""Stable Diffusion v1.x from one original (CompVis latent-diffusion) checkpoint file.

The official ODISE code loads ``sd-v1-3.ckpt``, the CompVis release, a Lightning checkpoint whose
``state_dict`` holds the UNet, the VAE (``first_stage_model.*``) and the CLIP text encoder
(``cond_stage_model.transformer.*``) in the latent-diffusion layout (key prefixes: ``PREFIXES``).
``weights.sd_source=/path/to/sd-v1-3.ckpt`` (or a ``.safetensors`` of the same layout) builds our
diffusers / transformers models from such a file, offline: the key mapping is diffusers' own
(``diffusers.loaders.single_file_utils``), the architecture our SD v1 shapes, so no config is
fetched from the hub.

Like the official code (latent-diffusion's ``use_ema: False`` at inference) the UNet's regular
weights are used when a file holds EMA weights too.

The file is read once for the three models, with ``weights_only=True``: foreign objects stored in
it (Lightning's callbacks) become inert placeholders, so no code named by the file runs. Each
model takes its part, and the file's tensors are released once all three have.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from odise_pl.errors import WeightsNotFoundError

PREFIXES = {
    "unet": "model." + "diffusion_model.",  # diffusers' LDM_UNET_KEY (split: it is no config key)
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
WHAT = {"unet": "diffusion UNet", "vae": "VAE", "text_encoder": "text encoder"}

# (real path, mtime) -> the parts not taken yet
_cache: dict[tuple[str, int], dict[str, dict[str, Tensor]]] = {}


def is_single_file(source: str) -> bool:
    """Whether ``weights.sd_source`` names one checkpoint file (not a diffusers folder or hub id)."""
    return os.path.isfile(source) or Path(source).suffix in (".ckpt", ".safetensors", ".pt", ".pth")


def read_ldm_checkpoint(path: str | os.PathLike, progress: bool = True) -> dict[str, Tensor]:
    """The tensors of a latent-diffusion checkpoint (``.ckpt`` pickle or ``.safetensors``), keys as stored."""
    from odise_pl.checkpoints.official import read_pickle_inert

    path = _existing(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = read_pickle_inert(path, progress, what="Stable Diffusion checkpoint")
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsNotFoundError(f"{path} holds no state dict: not a Stable Diffusion checkpoint")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"Stable Diffusion checkpoint file not found: {path}\n"
            "Download the original release (e.g. sd-v1-3.ckpt from the CompVis/stable-diffusion-v-1-3-original "
            "repository) and set `weights.sd_source=/path/to/sd-v1-3.ckpt`, or give a diffusers folder / hub id "
            "(`weights.sd_source=CompVis/stable-diffusion-v1-3`)."
        )
    return path


def take_part(path: str, part: str, progress: bool = True) -> dict[str, Tensor]:
    """One model's tensors (keys as stored, prefix included) from the file, read once for all three."""
    _existing(path)
    key = (os.path.realpath(path), os.stat(path).st_mtime_ns)
    parts = _cache.get(key)
    if parts is None or part not in parts:
        _cache.clear()  # one file at a time: these are several GB
        state = read_ldm_checkpoint(path, progress)
        parts = {name: {k: v for k, v in state.items() if k.startswith(p)} for name, p in PREFIXES.items()}
        _cache[key] = parts
    tensors = parts.pop(part)
    if not parts:
        del _cache[key]
    if not tensors:
        raise WeightsNotFoundError(
            f"{path} has no {WHAT[part]} weights (no keys starting with {PREFIXES[part]!r}): "
            "not a Stable Diffusion v1.x checkpoint in the original latent-diffusion layout. "
            "Give such a file (sd-v1-3.ckpt) or a diffusers folder / hub id as `weights.sd_source`."
        )
    return tensors


def _convert(part: str, tensors: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    if part == "unet":
        return convert_ldm_unet_checkpoint(tensors, dict(model.config))
    if part == "vae":
        return convert_ldm_vae_checkpoint(tensors, dict(model.config))
    converted = convert_ldm_clip_checkpoint(tensors)
    # transformers >= 5 keeps the text tower's modules at the top of CLIPTextModel
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # a buffer older transformers saved; ours recomputes it
    return {k: v for k, v in converted.items() if not k.endswith("position_ids")}


def load_part(path: str, part: str, model: nn.Module, progress: bool = True) -> nn.Module:
    """``model`` (built with SD v1's architecture) with its weights from the file; every weight of
    the model must be there with its shape, or the error says which are not.
    """
    tensors = _convert(part, take_part(path, part, progress), model)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{name} {len(keys)} (e.g. {keys[0]}"
            + (
                f": file {tuple(tensors[keys[0]].shape)} vs model {tuple(own[keys[0]].shape)}"
                if name == "shape"
                else ""
            )
            + ")"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        )
        raise WeightsNotFoundError(
            f"{path}: the {WHAT[part]} weights do not fit Stable Diffusion v1.x's architecture ({detail}). "
            "Give a v1.x checkpoint (sd-v1-3.ckpt) or a diffusers folder / hub id as `weights.sd_source`."
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)
    return model
