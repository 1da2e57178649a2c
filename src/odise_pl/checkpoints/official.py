"""Convert the authors' released ODISE checkpoints (detectron2 ``.pth``) into our trainable-only
checkpoint (``.safetensors``): ``python scripts/convert_odise_checkpoint.py IN.pth OUT.safetensors``.

Their parameter names come from NVlabs/ODISE (``odise/modeling/backbone/feature_extractor.py``,
``odise/modeling/meta_arch/{ldm,odise}.py``) and Mask2Former (``MSDeformAttnPixelDecoder``,
``MultiScaleMaskedTransformerDecoder``); our modules have the same tensors with the same shapes, so
the map is a renaming. It is written once, from our names to theirs (:func:`official_name`), and
inverted by enumerating our trainable state dict: every tensor of ours has exactly one source, a
file that lacks any of them is an error listing the missing names, and whatever of theirs is left
over is reported (frozen Stable Diffusion / CLIP weights, which ours load from ``odise_pl.weights``;
the buffer ``criterion.empty_weight``, which our criterion derives from its config).

A caption model converts into a model with the objectness head (``experiment=caption_*``), a label
model into one with the null embedding (``experiment=label_*``).

The file is read with ``torch.load(weights_only=True)``; detectron2 objects stored beside the
weights (dataset metadata) are mapped to inert placeholders, so no code from the file runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm import tqdm

from odise_pl.errors import CheckpointError

_FE = "backbone.feature_extractor."
_FP = "backbone.feature_projections.{tap}.0."
_PD = "sem_seg_head.pixel_decoder."
_TD = "sem_seg_head.predictor."

# Our key (regex) -> theirs (template; {tap}: the tap's official feature index, {head}: category_head
# for label models, word_head for caption models). First match wins.
_RULES: list[tuple[str, str]] = [
    # implicit captioner (LdmImplicitCaptionerExtractor)
    (r"captioner\.proj\.(weight|bias)", _FE + r"clip_project.linear.\1"),
    (r"captioner\.pos_embed", _FE + "clip_project.positional_embedding"),
    (r"captioner\.alpha", _FE + "alpha_cond"),
    (r"captioner\.time_proj\.(weight|bias)", _FE + r"time_embed_project.linear.\1"),
    (r"captioner\.time_pos_embed", _FE + "time_embed_project.positional_embedding"),
    (r"captioner\.beta", _FE + "alpha_cond_time_embed"),
    # feature pyramid (detectron2 BottleneckBlock, norm="GN": convK.norm, shortcut.norm)
    (r"pyramid\.blocks\.(\w+)\.conv(\d)\.weight", _FP + r"conv\2.weight"),
    (r"pyramid\.blocks\.(\w+)\.norm(\d)\.(weight|bias)", _FP + r"conv\2.norm.\3"),
    (r"pyramid\.blocks\.(\w+)\.shortcut\.0\.weight", _FP + "shortcut.weight"),
    (r"pyramid\.blocks\.(\w+)\.shortcut\.1\.(weight|bias)", _FP + r"shortcut.norm.\2"),
    # pixel decoder (MSDeformAttnPixelDecoder)
    (r"pixel_decoder\.input_proj\.(\d)\.([01])\.(weight|bias)", _PD + r"input_proj.\1.\2.\3"),
    (r"pixel_decoder\.level_embed", _PD + "transformer.level_embed"),
    (r"pixel_decoder\.layers\.(\d+)\.(.+)", _PD + r"transformer.encoder.layers.\1.\2"),
    (r"pixel_decoder\.mask_features\.(weight|bias)", _PD + r"mask_features.\1"),
    (r"pixel_decoder\.lateral\.0\.weight", _PD + "adapter_1.weight"),
    (r"pixel_decoder\.lateral\.1\.(weight|bias)", _PD + r"adapter_1.norm.\1"),
    (r"pixel_decoder\.output\.0\.weight", _PD + "layer_1.weight"),
    (r"pixel_decoder\.output\.1\.(weight|bias)", _PD + r"layer_1.norm.\1"),
    # transformer decoder (ODISEMultiScaleMaskedTransformerDecoder + PooledMaskEmbed)
    (r"transformer_decoder\.(query_feat|query_embed|level_embed)\.weight", _TD + r"\1.weight"),
    (r"transformer_decoder\.input_proj\.(\d)\.(weight|bias)", _TD + r"input_proj.\1.\2"),
    (
        r"transformer_decoder\.self_attn\.(\d+)\.attn\.(.+)",
        _TD + r"transformer_self_attention_layers.\1.self_attn.\2",
    ),
    (
        r"transformer_decoder\.self_attn\.(\d+)\.norm\.(weight|bias)",
        _TD + r"transformer_self_attention_layers.\1.norm.\2",
    ),
    (
        r"transformer_decoder\.cross_attn\.(\d+)\.attn\.(.+)",
        _TD + r"transformer_cross_attention_layers.\1.multihead_attn.\2",
    ),
    (
        r"transformer_decoder\.cross_attn\.(\d+)\.norm\.(weight|bias)",
        _TD + r"transformer_cross_attention_layers.\1.norm.\2",
    ),
    (
        r"transformer_decoder\.ffn\.(\d+)\.(linear1|linear2|norm)\.(weight|bias)",
        _TD + r"transformer_ffn_layers.\1.\2.\3",
    ),
    (r"transformer_decoder\.decoder_norm\.(weight|bias)", _TD + r"decoder_norm.\1"),
    (r"transformer_decoder\.mask_embed\.layers\.(\d)\.(weight|bias)", _TD + r"mask_embed.layers.\1.\2"),
    (r"transformer_decoder\.pooled_proj\.([01])\.(weight|bias)", _TD + r"post_mask_embed.pool_proj.\1.\2"),
    (r"transformer_decoder\.embed_head\.0\.(weight|bias)", _TD + r"post_mask_embed.mask_embed.0.\1"),
    (
        r"transformer_decoder\.embed_head\.1\.layers\.(\d)\.(weight|bias)",
        _TD + r"post_mask_embed.mask_embed.1.layers.\1.\2",
    ),
    (r"transformer_decoder\.class_embed\.(weight|bias)", _TD + r"class_embed.\1"),
    # classifier: the decoder's temperature, the text head's projection and null embedding
    (r"classifier\.logit_scale", _TD + "post_mask_embed.logit_scale"),
    (r"classifier\.text_proj\.(weight|bias)", r"{head}.text_proj.\1"),
    (r"classifier\.null_embed", "{head}.null_embed"),
]

# Frozen parts in their file: not ours to load (ours come from odise_pl.weights).
_FROZEN = re.compile(
    r"(backbone\.feature_extractor\.(ldm_extractor|clip)\.|(category_head|word_head|clip_head)\.clip\.|"
    r".*\.text_embed$|.*shared_noise$|pixel_(mean|std)$)"
)
# Buffers in their file that our modules derive from the config instead (key -> why).
_DERIVED = {
    "criterion.empty_weight": "the no-object weight of the class loss; ours is model.criterion.no_object_weight",
}


def their_feature_order(
    unet: list[int], vae_enc: list[int], vae_dec: list[int], timesteps: int = 1
) -> list[str]:
    """Our pyramid block names in the order of their ``feature_projections``: VAE encoder taps, UNet
    taps, VAE decoder taps (``LdmExtractor.reset_dim_stride``).
    """
    if timesteps != 1:
        raise CheckpointError("the released checkpoints use one timestep; several are not supported here")
    return (
        [f"vae_enc_{i}" for i in vae_enc] + [f"unet_up_{i}" for i in unet] + [f"vae_dec_{i}" for i in vae_dec]
    )


def official_name(key: str, feature_order: list[str], head: str) -> str:
    """The name in an official checkpoint of our trainable tensor ``key``."""
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        name = m.expand(template)
        if "{tap}" in name:
            tap = m.group(1)
            if tap not in feature_order:
                raise CheckpointError(
                    f"{key}: pyramid block {tap!r} is not one of the official taps {feature_order}"
                )
            name = name.replace("{tap}", str(feature_order.index(tap)))
        return name.replace("{head}", head)
    raise CheckpointError(f"no official counterpart is known for our tensor {key}")


def _stub(name: str) -> type:
    """A class standing for a foreign global: built from any arguments and state, doing nothing
    (``exec`` named by a hostile file becomes one of these, and is never called).
    """
    module, _, qual = name.rpartition(".")
    return type(
        qual,
        (),
        {
            "__module__": module,
            "__init__": lambda self, *args, **kwargs: None,
            "__setstate__": lambda self, state: None,
        },
    )


def read_pickle_inert(path: str | Path, progress: bool = True, what: str = "checkpoint") -> object:
    """A pickled checkpoint (``torch.save``) loaded with ``weights_only=True``, where each foreign
    object stored beside the tensors (detectron2 metadata, a training framework's callbacks)
    becomes an inert placeholder: no code named by the file runs. ``progress``: a bar of the bytes
    read, with the rate (released files are several GB).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    allowed: list = []
    for _ in range(50):
        try:
            with (
                open(path, "rb") as raw,
                tqdm.wrapattr(
                    raw,
                    "read",
                    total=path.stat().st_size,
                    desc=f"reading {path.name}",
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    disable=not progress,
                    leave=False,
                ) as f,
                torch.serialization.safe_globals(allowed),
            ):
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for a foreign global, RuntimeError for a broken zip
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            if found is None:
                raise CheckpointError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from err
            name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"  # torch omits it
            allowed.append((_stub(name), name))
    raise CheckpointError(f"{path}: too many foreign objects in the file")


def read_their_checkpoint(path: str | Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """The model state dict of a detectron2 checkpoint (:func:`read_pickle_inert`). Non-tensor
    entries are dropped.
    """
    path = Path(path)
    ckpt = read_pickle_inert(path, progress)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds no state dict (expected a detectron2 checkpoint with a 'model' entry)"
        )
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def is_caption_checkpoint(theirs: dict[str, torch.Tensor]) -> bool:
    """A caption model has the binary objectness head and a ``word_head``; a label model neither."""
    return any(k.startswith(("word_head.", _TD + "class_embed.")) for k in theirs)


def convert_state_dict(
    theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], feature_order: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Map ``theirs`` onto the keys and shapes of ``ours`` (our trainable state dict).

    Every key of ``ours`` must find its official tensor, with the same shape: otherwise a
    :class:`CheckpointError` lists every missing name / names both sides of a shape mismatch.
    Returns (converted state dict, report) with report keys ``skipped_frozen`` (their frozen
    tensors), ``derived`` (their buffers our modules compute from the config, with why) and
    ``unmapped`` (anything else of theirs: not expected in a released checkpoint).
    """
    head = "category_head" if "classifier.null_embed" in ours else "word_head"
    sources = {key: official_name(key, feature_order, head) for key in ours}
    missing = sorted(f"{src} (for our {key})" for key, src in sources.items() if src not in theirs)
    if missing:
        kind = "label" if head == "category_head" else "caption"
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensors a {kind} model needs: " + "; ".join(missing)
        )
    out: dict[str, torch.Tensor] = {}
    for key, src in sources.items():
        value, want = theirs[src], ours[key]
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{src} {tuple(value.shape)} does not fit our {key} {tuple(want.shape)} (check the experiment)"
            )
        out[key] = value.to(want.dtype).clone()
    used = set(sources.values())
    report: dict[str, list[str]] = {"skipped_frozen": [], "derived": [], "unmapped": []}
    for key in theirs:
        if key in used:
            continue
        if key in _DERIVED:
            report["derived"].append(f"{key} ({_DERIVED[key]})")
        elif _FROZEN.match(key):
            report["skipped_frozen"].append(key)
        else:
            report["unmapped"].append(key)
    return out, report
