"""Convert the authors' released ODISE checkpoints (detectron2 ``.pth``) into our trainable-only
checkpoint (``.safetensors``): ``python scripts/convert_odise_checkpoint.py IN.pth OUT.safetensors``.

Their parameter names come from NVlabs/ODISE (``odise/modeling/backbone/feature_extractor.py``,
``odise/modeling/meta_arch/{ldm,odise}.py``) and Mask2Former (``MSDeformAttnPixelDecoder``,
``MultiScaleMaskedTransformerDecoder``); our modules keep their shapes, so the map is a renaming
plus three reshapes (a caption model converts into a model with the objectness head,
``experiment=caption_*``; a label model into one without, ``experiment=label_*``):

* ``clip_project.positional_embedding`` (1, 77, D) -> ``captioner.pos_embed`` (77, D);
* ``category_head.null_embed`` (1, D) -> ``classifier.null_embed`` (D,);
* ``time_embed_project.positional_embedding`` (1, T, 1280): with one timestep (T = 1, as released)
  it is a constant added after the linear map, so it is folded into ``captioner.time_proj.bias``.

Frozen weights in their file (Stable Diffusion, CLIP, cached text embeddings) are skipped: ours
come from ``odise_pl.weights``. What cannot be mapped is listed, never silently dropped. A caption
model has no null embedding (its no-object score is the objectness head's), so the report lists
``classifier.null_embed`` as left at initialisation: caption models do not use it.

The file is read with ``torch.load(weights_only=True)``; detectron2 objects stored beside the
weights (dataset metadata) are mapped to inert placeholders, so no code from the file runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from odise_pl.checkpoint import CheckpointError

# Their key (regex) -> ours (template). Order matters: first match wins.
_RULES: list[tuple[str, str]] = [
    # implicit captioner
    (r"backbone\.feature_extractor\.clip_project\.linear\.(weight|bias)", r"captioner.proj.\1"),
    (r"backbone\.feature_extractor\.clip_project\.positional_embedding", "captioner.pos_embed"),
    (r"backbone\.feature_extractor\.alpha_cond", "captioner.alpha"),
    (r"backbone\.feature_extractor\.time_embed_project\.linear\.(weight|bias)", r"captioner.time_proj.\1"),
    (r"backbone\.feature_extractor\.alpha_cond_time_embed", "captioner.beta"),
    # feature pyramid (detectron2 BottleneckBlock: convK.norm, shortcut.norm)
    (r"backbone\.feature_projections\.(\d+)\.0\.conv(\d)\.weight", r"pyramid.blocks.{\1}.conv\2.weight"),
    (
        r"backbone\.feature_projections\.(\d+)\.0\.conv(\d)\.norm\.(weight|bias)",
        r"pyramid.blocks.{\1}.norm\2.\3",
    ),
    (r"backbone\.feature_projections\.(\d+)\.0\.shortcut\.weight", r"pyramid.blocks.{\1}.shortcut.0.weight"),
    (
        r"backbone\.feature_projections\.(\d+)\.0\.shortcut\.norm\.(weight|bias)",
        r"pyramid.blocks.{\1}.shortcut.1.\2",
    ),
    # pixel decoder
    (
        r"sem_seg_head\.pixel_decoder\.input_proj\.(\d)\.([01])\.(weight|bias)",
        r"pixel_decoder.input_proj.\1.\2.\3",
    ),
    (r"sem_seg_head\.pixel_decoder\.transformer\.level_embed", "pixel_decoder.level_embed"),
    (
        r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.(.+)",
        r"pixel_decoder.layers.\1.\2",
    ),
    (r"sem_seg_head\.pixel_decoder\.mask_features\.(weight|bias)", r"pixel_decoder.mask_features.\1"),
    (r"sem_seg_head\.pixel_decoder\.adapter_1\.weight", "pixel_decoder.lateral.0.weight"),
    (r"sem_seg_head\.pixel_decoder\.adapter_1\.norm\.(weight|bias)", r"pixel_decoder.lateral.1.\1"),
    (r"sem_seg_head\.pixel_decoder\.layer_1\.weight", "pixel_decoder.output.0.weight"),
    (r"sem_seg_head\.pixel_decoder\.layer_1\.norm\.(weight|bias)", r"pixel_decoder.output.1.\1"),
    # transformer decoder
    (
        r"sem_seg_head\.predictor\.(query_feat|query_embed|level_embed)\.weight",
        r"transformer_decoder.\1.weight",
    ),
    (
        r"sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.(.+)",
        r"transformer_decoder.self_attn.\1.attn.\2",
    ),
    (
        r"sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.norm\.(weight|bias)",
        r"transformer_decoder.self_attn.\1.norm.\2",
    ),
    (
        r"sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)",
        r"transformer_decoder.cross_attn.\1.attn.\2",
    ),
    (
        r"sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.norm\.(weight|bias)",
        r"transformer_decoder.cross_attn.\1.norm.\2",
    ),
    (
        r"sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.(linear1|linear2|norm)\.(weight|bias)",
        r"transformer_decoder.ffn.\1.\2.\3",
    ),
    (r"sem_seg_head\.predictor\.decoder_norm\.(weight|bias)", r"transformer_decoder.decoder_norm.\1"),
    (
        r"sem_seg_head\.predictor\.mask_embed\.layers\.(\d)\.(weight|bias)",
        r"transformer_decoder.mask_embed.layers.\1.\2",
    ),
    (
        r"sem_seg_head\.predictor\.post_mask_embed\.pool_proj\.([01])\.(weight|bias)",
        r"transformer_decoder.pooled_proj.\1.\2",
    ),
    (
        r"sem_seg_head\.predictor\.post_mask_embed\.mask_embed\.0\.(weight|bias)",
        r"transformer_decoder.embed_head.0.\1",
    ),
    (
        r"sem_seg_head\.predictor\.post_mask_embed\.mask_embed\.1\.layers\.(\d)\.(weight|bias)",
        r"transformer_decoder.embed_head.1.layers.\1.\2",
    ),
    (r"sem_seg_head\.predictor\.post_mask_embed\.logit_scale", "classifier.logit_scale"),
    (r"category_head\.null_embed", "classifier.null_embed"),
    # the caption models' binary object / no-object head
    (r"sem_seg_head\.predictor\.class_embed\.(weight|bias)", r"transformer_decoder.class_embed.\1"),
]

# Frozen parts and buffers in their file: not ours to load (ours come from odise_pl.weights).
_FROZEN = re.compile(
    r"(backbone\.feature_extractor\.(ldm_extractor|clip)\.|(category_head|word_head|clip_head)\.clip\.|"
    r".*\.text_embed$|.*shared_noise$|pixel_(mean|std)$|criterion\.)"
)
# Kept in theirs, absent from ours by design (key -> why); none at present.
_NO_COUNTERPART: dict[str, str] = {}
_TIME_POS = "backbone.feature_extractor.time_embed_project.positional_embedding"


def their_feature_order(
    unet: list[int], vae_enc: list[int], vae_dec: list[int], timesteps: int = 1
) -> list[str]:
    """Our pyramid block names in the order of their ``feature_projections``: VAE encoder taps, UNet
    taps (repeated per timestep), VAE decoder taps (``LdmExtractor.reset_dim_stride``).
    """
    if timesteps != 1:
        raise CheckpointError("the released checkpoints use one timestep; several are not supported here")
    return (
        [f"vae_enc_{i}" for i in vae_enc] + [f"unet_up_{i}" for i in unet] + [f"vae_dec_{i}" for i in vae_dec]
    )


def _stub(name: str) -> type:
    module, _, qual = name.rpartition(".")
    return type(qual, (), {"__module__": module, "__setstate__": lambda self, state: None})


def read_their_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a detectron2 checkpoint, loaded with ``weights_only=True``; non-tensor
    objects beside it (detectron2 metadata) become inert placeholders. Non-tensor entries are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    allowed: list = []
    for _ in range(50):
        try:
            with torch.serialization.safe_globals(allowed):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as err:  # UnpicklingError for a foreign global, RuntimeError for a broken zip
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            if found is None:
                raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
            allowed.append((_stub(found.group(1)), found.group(1)))
    else:
        raise CheckpointError(f"{path}: too many foreign objects in the file")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds no state dict (expected a detectron2 checkpoint with a 'model' entry)"
        )
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def convert_state_dict(
    theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], feature_order: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Map ``theirs`` onto the keys and shapes of ``ours`` (our trainable state dict).

    Returns (converted state dict, report) with report keys ``unmapped`` (their trainable keys with
    no rule), ``no_counterpart``, ``skipped_frozen`` and ``missing`` (our keys left at initialisation).
    Shapes must agree exactly after the documented reshapes; a mismatch is an error naming both keys.
    """
    out: dict[str, torch.Tensor] = {}
    report: dict[str, list[str]] = {"unmapped": [], "no_counterpart": [], "skipped_frozen": [], "missing": []}
    for key, value in theirs.items():
        if key == _TIME_POS:
            continue  # folded into the time projection bias below
        if key in _NO_COUNTERPART:
            report["no_counterpart"].append(f"{key} ({_NO_COUNTERPART[key]})")
            continue
        target = None
        for pattern, template in _RULES:
            m = re.fullmatch(pattern, key)
            if m:
                target = m.expand(template)
                break
        if target is None:
            report["skipped_frozen" if _FROZEN.match(key) else "unmapped"].append(key)
            continue
        idx = re.search(r"\{(\d+)\}", target)
        if idx:
            k = int(idx.group(1))
            if k >= len(feature_order):
                raise CheckpointError(
                    f"{key}: feature projection {k}, but our backbone taps {len(feature_order)} features"
                )
            target = target.replace(idx.group(0), feature_order[k])
        if target not in ours:
            raise CheckpointError(
                f"{key} maps to {target}, which this model does not have (check the experiment)"
            )
        want = ours[target].shape
        if value.shape != want:
            if value.numel() == ours[target].numel() and value.squeeze(0).shape == want:
                value = value.reshape(want)  # the documented (1, ...) -> (...) reshapes
            else:
                raise CheckpointError(f"{key} {tuple(value.shape)} does not fit {target} {tuple(want)}")
        out[target] = value.to(ours[target].dtype).clone()
    if _TIME_POS in theirs and "captioner.time_proj.bias" in out:
        pos = theirs[_TIME_POS]
        if pos.shape[1] != 1:
            raise CheckpointError(
                f"{_TIME_POS} has {pos.shape[1]} timesteps; only one can be folded into our bias"
            )
        out["captioner.time_proj.bias"] = out["captioner.time_proj.bias"] + pos.reshape(-1).to(
            out["captioner.time_proj.bias"].dtype
        )
    report["missing"] = sorted(set(ours) - set(out))
    return out, report
