"""Segment one image with any vocabulary: what the demo, the notebooks and other tools call.

``load_model`` builds a trained model from an experiment and a checkpoint; ``segment_image`` runs
open-vocabulary panoptic inference on one image; ``write_outputs`` saves the overlay and the
COCO-format panoptic PNG + JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from odise_pl.config import CONFIG_DIR
from odise_pl.data.io import ids_to_rgb
from odise_pl.data.transforms import ResizeShortestEdge, pad_to_divisible
from odise_pl.data.vocab import Vocabulary, dataset_vocab, load_vocab_file, parse_vocab_string
from odise_pl.errors import VocabularyError
from odise_pl.fs import atomic_write
from odise_pl.inference.limits import InputLimits
from odise_pl.visualize import overlay


def build_vocabulary(
    vocab: str | None = None,
    vocab_file: str | None = None,
    dataset_vocabs: str | None = None,
    limits: InputLimits | None = None,
) -> Vocabulary:
    """Union of the given sources, in the order string (``"cat;dog,puppy"``), file, shipped
    vocabularies (``"coco,ade150"``); COCO when none is given. ``limits``: checked on the text
    before it is parsed and on the vocabulary before anything is tokenised.
    """
    limits = limits or InputLimits.none()
    parts: list[Vocabulary] = []
    if vocab is not None:
        limits.check_text(vocab)
        parts.append(parse_vocab_string(vocab))
    if vocab_file:
        limits.check_file(vocab_file)
        parts.append(load_vocab_file(vocab_file))
    if dataset_vocabs:
        parts += [dataset_vocab(n.strip()) for n in dataset_vocabs.split(",") if n.strip()]
    if not parts:
        if vocab is not None or vocab_file is not None or dataset_vocabs is not None:
            raise VocabularyError("the vocabulary is empty")
        parts = [dataset_vocab("coco")]
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    limits.check_vocabulary(out)
    return out


def load_model(
    experiment: str | None = None,
    checkpoint: str | None = None,
    overrides: list[str] | tuple = (),
    trust_config: bool = False,
):
    """(LightningModule, cfg) composed like training (``conf/train.yaml`` with ``experiment=``
    and ``overrides``), with the trainable weights of ``checkpoint`` if given, in eval mode.

    A self-describing checkpoint (:mod:`odise_pl.checkpoints.description`) brings its own model
    config: ``experiment`` and model overrides are then needed only to contradict it, which is an
    error naming both values. Without a checkpoint ``experiment`` defaults to ``tiny``. The stored
    config is checked as data (:mod:`odise_pl.checkpoints.trust`) unless ``trust_config`` (only
    for files you trust: it builds whatever the file names). The file is read once.
    """
    import hydra
    from hydra import compose, initialize_config_dir

    from odise_pl.checkpoints import load_trainable, read_checkpoint_file
    from odise_pl.checkpoints.description import apply_description

    ckpt = read_checkpoint_file(checkpoint, trust=trust_config) if checkpoint else None
    desc = ckpt.description if ckpt else None
    chosen = [f"experiment={experiment}"] if experiment else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*chosen, "paths.output_dir=.", *overrides])
        if desc is not None:
            cfg = apply_description(cfg, compose("train", overrides=["paths.output_dir=."]), desc, checkpoint)
    torch.manual_seed(cfg.seed)
    module = hydra.utils.instantiate(cfg.model)
    if ckpt is not None:
        load_trainable(module.net, ckpt)
    module.net.eval()
    return module, cfg


@torch.no_grad()
def segment_image(
    module,
    image: np.ndarray,
    vocabulary: Vocabulary,
    short_edge: int = 512,
    max_size: int | None = None,
    mode: str | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """``image`` (H, W, 3) uint8 RGB -> (segment ids (H, W) int64, segments ``{id, category_id
    (index into the vocabulary), isthing, score}``), the image resized to ``short_edge`` for the
    network (longest side at most ``max_size``, default 4x) and the result back to its size.
    """
    resize = ResizeShortestEdge(short_edge, max_size or max(short_edge * 4, 2048))
    h, w = image.shape[:2]
    item = resize({"image": torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)})
    images, sizes = pad_to_divisible([item["image"]], module.net.size_divisibility)
    meta = [{"input_size": sizes[0], "height": h, "width": w}]
    pred = module.make_predictor(mode=mode)(
        images, meta, vocabulary.names, vocabulary.isthing, tasks=("panoptic",)
    )[0]
    ids, segments = pred["panoptic"]
    return ids.cpu().numpy().astype(np.int64), segments


def write_outputs(
    out_dir: str | Path,
    stem: str,
    image: np.ndarray,
    ids: np.ndarray,
    segments: list[dict],
    vocabulary: Vocabulary,
) -> list[dict]:
    """``STEM_overlay.png``, ``STEM_panoptic.png`` and ``STEM_panoptic.json`` (COCO panoptic format,
    category ids the vocabulary's) in ``out_dir``, each written atomically; returns the segments'
    records as the JSON lists them.
    """
    out_dir = Path(out_dir)
    h, w = ids.shape
    info = [
        {
            "id": s["id"],
            "category_id": int(vocabulary.ids[s["category_id"]]),
            "category": vocabulary.display_names[s["category_id"]],
            "isthing": int(s["isthing"]),
            "score": round(s["score"], 4),
            "area": int((ids == s["id"]).sum()),
        }
        for s in segments
    ]
    record = {
        "file_name": f"{stem}_panoptic.png",
        "height": h,
        "width": w,
        "segments_info": info,
        "categories": [
            {"id": i, "name": n[0], "synonyms": n, "isthing": int(t)}
            for i, n, t in zip(vocabulary.ids, vocabulary.names, vocabulary.isthing)
        ],
    }
    pictures = {
        f"{stem}_overlay.png": overlay(image, ids, segments, vocabulary.display_names),
        f"{stem}_panoptic.png": Image.fromarray(ids_to_rgb(ids)),
    }
    for name, picture in pictures.items():
        atomic_write(out_dir / name, lambda f, p=picture: p.save(f, format="PNG"))
    atomic_write(out_dir / f"{stem}_panoptic.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
    return info
