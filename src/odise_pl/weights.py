"""Resolve every pretrained model ODISE uses, in one place.

Each loader takes ``mode``:

* ``pretrained`` -- the users' default: real weights through the library's own loading
  (``from_pretrained`` for diffusers / transformers, open_clip pretrained tags or a local file),
  which uses the Hugging Face cache and downloads when online;
* ``random`` -- the full-size architecture, randomly initialised (smoke runs, benchmarks,
  parameter counts; no download);
* ``tiny`` -- a small configuration of the *same classes* (tests, the default experiment);
* ``meta`` -- the full-size architecture on PyTorch's ``meta`` device: shapes without values or
  memory (parameter counts, checkpoint conversion); nothing can run on it.

A missing weight in ``pretrained`` mode raises :class:`WeightsNotFoundError`, one message naming
the model, where it was looked for, and the config override that fixes it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch
from torch import nn

from odise_pl.errors import WeightsNotFoundError
from odise_pl.single_file import is_single_file, load_part

Mode = Literal["pretrained", "random", "tiny", "meta"]
MODES = ("pretrained", "random", "tiny", "meta")

# Stable Diffusion v1.x shapes (any v1.x checkpoint in diffusers format has these); used for
# `random` mode so parameter counts match the paper without a download.
SD_V1_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD_V1_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
# CLIP ViT-L/14 text tower, as SD v1 uses it (transformers CLIPTextModel).
SD_V1_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD_V1_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)

# Tiny versions: same classes, same block structure (4 levels, 2 layers per block, so the
# official tap indices 2/5/8/11, 5/7 and 2/5 all exist), a few hundred thousand parameters each.
TINY_UNET = dict(
    SD_V1_UNET,
    sample_size=16,
    block_out_channels=(16, 32, 32, 32),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_VAE = dict(SD_V1_VAE, block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64)
TINY_TEXT = dict(
    SD_V1_TEXT,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=32,
)

# Stable Diffusion 2.x (stabilityai/stable-diffusion-2-1: 768^2, v-prediction; -2-1-base: 512^2,
# epsilon): the v1 layout with linear projections in the transformers, per-level head sizes and
# OpenCLIP ViT-H's text tower (1024-d, its last layer dropped, padding with "!" = id 0).
SD_V2_UNET = dict(
    SD_V1_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
SD_V2_TEXT = dict(
    SD_V1_TEXT,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)
# SDXL (stabilityai/stable-diffusion-xl-base-1.0): three levels, 1 / 2 / 10 transformer layers,
# cross-attention to the concatenated tokens of two text towers (CLIP ViT-L 768 + OpenCLIP bigG
# 1280 = 2048), and the added conditioning: bigG's pooled embedding and six size / crop numbers.
SDXL_UNET = dict(
    SD_V1_UNET,
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1280 + 6 * 256,
)
SDXL_VAE = dict(SD_V1_VAE, sample_size=1024, scaling_factor=0.13025)
SDXL_TEXT_2 = dict(
    SD_V1_TEXT,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
TINY_V2_UNET = dict(TINY_UNET, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True)
TINY_V2_TEXT = dict(TINY_TEXT, hidden_act="gelu")
TINY_XL_UNET = dict(
    SDXL_UNET,
    sample_size=16,
    block_out_channels=(16, 32, 32),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=32 + 48,
    norm_num_groups=8,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=48 + 6 * 8,
)
TINY_XL_TEXT_2 = dict(
    TINY_TEXT, hidden_size=48, intermediate_size=96, num_attention_heads=4, projection_dim=48
)

# arch -> part -> (full size, tiny): what random / tiny / meta build and a single file is loaded into
ARCHITECTURES = {
    "sd1": {
        "unet": ("SD_V1_UNET", "TINY_UNET"),
        "vae": ("SD_V1_VAE", "TINY_VAE"),
        "text_encoder": ("SD_V1_TEXT", "TINY_TEXT"),
    },
    "sd2": {
        "unet": ("SD_V2_UNET", "TINY_V2_UNET"),
        "vae": ("SD_V1_VAE", "TINY_VAE"),
        "text_encoder": ("SD_V2_TEXT", "TINY_V2_TEXT"),
    },
    "sdxl": {
        "unet": ("SDXL_UNET", "TINY_XL_UNET"),
        "vae": ("SDXL_VAE", "TINY_VAE"),
        "text_encoder": ("SD_V1_TEXT", "TINY_TEXT"),
        "text_encoder_2": ("SDXL_TEXT_2", "TINY_XL_TEXT_2"),
    },
}
ARCH_NAMES = {"sd1": "Stable Diffusion v1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}


def _sizes(arch: str, part: str) -> tuple[dict, dict]:
    """(full, tiny) config dicts of ``part`` of ``arch``, read from this module's globals at call
    time (the tests make v1 tiny to load a small single file).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown diffusion architecture {arch!r}: one of {sorted(ARCHITECTURES)}")
    if part not in ARCHITECTURES[arch]:
        raise ValueError(f"{ARCH_NAMES[arch]} has no {part}")
    full, tiny = ARCHITECTURES[arch][part]
    return globals()[full], globals()[tiny]


DEFAULT_SD = "CompVis/stable-diffusion-v1-3"  # PARITY: the official model is built on SD v1.3
SD_HINT = (
    "Download a Stable Diffusion v1.x checkpoint in diffusers format (e.g. `huggingface-cli download {src}`) "
    "or point the config at a local folder: `weights.sd_source=/path/to/stable-diffusion-v1-3`, "
    "or at the original single-file release: `weights.sd_source=/path/to/sd-v1-3.ckpt`. "
    "For a run without weights use `weights.mode=random` (full size) or `weights.mode=tiny`."
)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"weights mode must be one of {MODES}, got {mode!r}")


def _device(mode: str):
    """Where a non-pretrained model is built: ``meta`` for shapes only, else the default device."""
    return torch.device("meta") if mode == "meta" else contextlib.nullcontext()


def _frozen(module: nn.Module) -> nn.Module:
    # The one place where frozen models are frozen: eval mode, no gradients.
    module.eval()
    module.requires_grad_(False)
    return module


def _from_pretrained(cls, source: str, subfolder: str, what: str):
    where = source if os.path.isdir(source) else f"Hugging Face hub id {source!r} (cache: {_hf_cache()})"
    try:
        return cls.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError, EnvironmentError) as err:  # noqa: UP024 - hub errors subclass OSError
        raise WeightsNotFoundError(
            f"cannot load the {what} ({cls.__name__}, subfolder {subfolder!r}) from {where}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            + SD_HINT.format(src=source)
        ) from err


def _hf_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


def _sd_part(mode: str, source: str, cls, subfolder: str, what: str, arch: str, wrap=None) -> nn.Module:
    """One part of the diffusion model, frozen: ``cls.from_pretrained(source, subfolder)``, or
    built from ``arch``'s sizes of that part (full, tiny), through ``wrap`` (a config class) when
    given; a ``source`` that is one checkpoint file is built full size and loaded from the file's
    part ``subfolder`` (SD v1 only).
    """
    _check_mode(mode)
    sizes = _sizes(arch, subfolder)
    if mode == "pretrained" and not is_single_file(source):
        return _frozen(_from_pretrained(cls, source, subfolder, what))
    if mode == "pretrained" and arch != "sd1":
        raise WeightsNotFoundError(
            f"{source}: single-file checkpoints are read for Stable Diffusion v1.x only; give this model "
            "in diffusers format (a folder with unet/, vae/, text_encoder/, ... or a hub id) as `weights.sd_source`"
        )
    kwargs = sizes[1] if mode == "tiny" else sizes[0]
    with _device(mode):
        model = cls(wrap(**kwargs)) if wrap else cls(**kwargs)
    if mode == "pretrained":  # the original single-file release (sd-v1-3.ckpt): SD v1's shapes, its weights
        load_part(source, subfolder, model)
    return _frozen(model)


def load_unet(
    mode: Mode = "pretrained", source: str = DEFAULT_SD, arch: str = "sd1", unet_source: str | None = None
) -> nn.Module:
    """The diffusion model's ``UNet2DConditionModel``, frozen.

    Args:
        mode: see module docstring.
        source: the base model: a diffusers folder, a hub id, or one original checkpoint file
            (``sd-v1-3.ckpt``: :mod:`odise_pl.single_file`).
        arch: ``sd1`` | ``sd2`` | ``sdxl``: the architecture built by ``random`` / ``tiny`` / ``meta``
            and expected from ``source``.
        unet_source: another UNet of the same architecture in place of the base model's (a
            fine-tuned one): a diffusers folder or hub id holding the UNet itself or a ``unet/``
            subfolder. ``pretrained`` mode only.
    """
    from diffusers import UNet2DConditionModel

    if mode == "pretrained" and unet_source:
        model = _frozen(_from_unet_source(UNet2DConditionModel, unet_source))
    else:
        model = _sd_part(mode, source, UNet2DConditionModel, "unet", "diffusion UNet", arch)
    _check_arch(model, arch, unet_source or source)
    return model


def _from_unet_source(cls, source: str):
    if os.path.isdir(source):
        nested = os.path.isdir(os.path.join(source, "unet"))
        return _from_pretrained(cls, source, "unet" if nested else None, "diffusion UNet")
    try:  # a hub id: the UNet's own repository, or a pipeline's unet/
        return cls.from_pretrained(source)
    except (OSError, ValueError, EnvironmentError):  # noqa: UP024
        return _from_pretrained(cls, source, "unet", "diffusion UNet")


def _check_arch(unet: nn.Module, arch: str, source: str) -> None:
    """A loaded UNet must be the architecture the config's other parts (text encoders, taps) expect."""
    full, tiny = _sizes(arch, "unet")
    cfg = unet.config
    is_xl = getattr(cfg, "addition_embed_type", None) == "text_time"
    levels, cross = len(cfg.block_out_channels), int(cfg.cross_attention_dim)
    if (
        is_xl != (arch == "sdxl")
        or levels != len(full["block_out_channels"])
        or cross not in (full["cross_attention_dim"], tiny["cross_attention_dim"])
    ):
        found = "SDXL" if is_xl else f"{levels} levels, {cross}-d cross-attention"
        raise WeightsNotFoundError(
            f"the UNet from {source} ({found}) is not {ARCH_NAMES[arch]}: choose the backbone that "
            "matches it (`backbone=diffusion` for v1, `backbone=sd2`, `backbone=sdxl`) or point "
            "`weights.sd_source` / `weights.unet_source` at a model of this one"
        )


def load_vae(mode: Mode = "pretrained", source: str = DEFAULT_SD, arch: str = "sd1") -> nn.Module:
    """The diffusion model's ``AutoencoderKL``, frozen."""
    from diffusers import AutoencoderKL

    return _sd_part(mode, source, AutoencoderKL, "vae", "VAE", arch)


def load_text_encoder(
    mode: Mode = "pretrained", source: str = DEFAULT_SD, arch: str = "sd1", subfolder: str = "text_encoder"
) -> nn.Module:
    """A text tower of the diffusion model as transformers builds it, frozen: ``CLIPTextModel``
    (SD v1: CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H), or for SDXL's ``text_encoder_2`` (OpenCLIP
    bigG) ``CLIPTextModelWithProjection``, whose pooled embedding conditions the UNet.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if subfolder == "text_encoder_2" else CLIPTextModel
    return _sd_part(mode, source, cls, subfolder, "text encoder", arch, wrap=CLIPTextConfig)


def load_scheduler(mode: Mode = "pretrained", source: str = DEFAULT_SD, arch: str = "sd1"):
    """The DDPM noise schedule (only ``alphas_cumprod`` is used: Eq. 1; SD v1, 2.x and SDXL share
    it; whether a model predicts noise or velocity does not change its features).
    """
    from diffusers import DDPMScheduler

    _check_mode(mode)
    _sizes(arch, "unet")
    if mode == "pretrained" and os.path.isdir(os.path.join(source, "scheduler")):
        return DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    # The hub's scheduler config is these numbers; building it avoids a download for a 1 KB file.
    return DDPMScheduler(**SD_V1_SCHEDULER)


def tiny_clip_config() -> dict:
    """open_clip ``CLIP`` kwargs for a tiny ViT CLIP with the real tokenizer's vocabulary."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return dict(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    )


def load_open_clip(
    mode: Mode = "pretrained", name: str = "ViT-L-14-336", pretrained: str = "openai"
) -> nn.Module:
    """An open_clip CLIP model, frozen.

    Args:
        mode: see module docstring.
        name: open_clip architecture name (``open_clip.list_models()``).
        pretrained: a pretrained tag (``open_clip.list_pretrained()``) or a path to a local weights file.

    """
    import open_clip

    _check_mode(mode)
    if mode == "tiny":
        return _frozen(open_clip.model.CLIP(**tiny_clip_config()))
    if mode in ("random", "meta"):
        with _device(mode):
            return _frozen(
                open_clip.create_model(name, pretrained=None, device="meta" if mode == "meta" else "cpu")
            )
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    except Exception as err:  # open_clip raises RuntimeError / hub errors / FileNotFoundError
        raise WeightsNotFoundError(
            f"cannot load open_clip model {name!r} with pretrained={pretrained!r} "
            f"(looked in the local path if one was given, else the Hugging Face cache {_hf_cache()}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            f"Download it while online (`python -c \"import open_clip; open_clip.create_model('{name}', "
            f"pretrained='{pretrained}')\"`) or point the config at a local file: "
            "`weights.clip_pretrained=/path/to/open_clip_pytorch_model.bin`. "
            "For a run without weights use `weights.mode=random` or `weights.mode=tiny`."
        ) from err
    return _frozen(model)


# Small settings of each timm family (tests / the tiny experiment): same classes, a few layers.
_TIMM_TINY = {
    "vit": dict(depth=4, embed_dim=32, num_heads=2),
    "convnext": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    "swin": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
}


def load_timm(
    mode: Mode = "pretrained",
    name: str = "vit_large_patch14_clip_336.openai",
    out_indices: tuple[int, ...] | list[int] = (0, 1, 2, 3),
    checkpoint: str | None = None,
    **kwargs,
) -> nn.Module:
    """A frozen timm feature extractor (``features_only=True``) for the backbone ablation (Table 3).

    Args:
        mode: see module docstring (``tiny``: the same family with a few narrow layers).
        name: timm model name with its pretrained tag (``timm.list_pretrained()``).
        out_indices: blocks (ViT) or stages (hierarchical models) to return.
        checkpoint: a local weights file instead of the hub download.
        kwargs: passed to ``timm.create_model`` (e.g. ``dynamic_img_size=True`` for ViTs).
    """
    import timm

    _check_mode(mode)
    kwargs = dict(kwargs)
    if mode == "tiny":
        family = next((k for k in _TIMM_TINY if name.startswith(k)), None)
        if family is None:
            raise ValueError(f"no tiny setting for timm model {name!r} (families: {sorted(_TIMM_TINY)})")
        kwargs.update(_TIMM_TINY[family])
        if family == "vit":  # 4 blocks, all tapped
            out_indices = (0, 1, 2, 3)
    pretrained = mode == "pretrained"
    create = dict(features_only=True, out_indices=tuple(out_indices), **kwargs)
    if checkpoint:
        create["pretrained_cfg_overlay"] = dict(file=checkpoint)
    try:
        with _device(mode):
            model = timm.create_model(name, pretrained=pretrained, **create)
    except Exception as err:  # hub / file errors; a wrong name is a RuntimeError too
        if not pretrained:
            raise
        raise WeightsNotFoundError(
            f"cannot load timm model {name!r} (Hugging Face cache {_hf_cache()}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            f"Download it while online (`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`) "
            "or point the config at a local file: `model.net.backbone.model.checkpoint=/path/to/model.safetensors`. "
            "For a run without weights use `weights.mode=random` or `weights.mode=tiny`."
        ) from err
    return _frozen(model)


def count_parameters(module: nn.Module, trainable: bool | None = None) -> int:
    """Number of (unique) parameters; ``trainable`` filters on ``requires_grad``."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable is not None and p.requires_grad != trainable):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """``torch.load`` that never unpickles code (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)
