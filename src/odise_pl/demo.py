"""Segment your own image with any vocabulary.

``python -m odise_pl.demo --image IMG [--vocab "cat;dog,puppy;grass"] [--vocab-file F]
[--dataset-vocab coco,ade150,lvis] --output OUT_DIR [--checkpoint CKPT] [--experiment tiny]``

Writes ``OUT_DIR/NAME_overlay.png`` (labelled segments over the image), ``NAME_panoptic.png`` +
``NAME_panoptic.json`` (COCO panoptic format; category ids are the vocabulary's) and prints the
segment list. Categories: ``;`` separates them, ``,`` separates synonyms. Without any vocabulary
option the COCO vocabulary is used. With no checkpoint the trainable part is randomly initialised
(fine for trying the pipeline; meaningless segments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from odise_pl.data.io import ids_to_rgb, load_image
from odise_pl.data.transforms import ResizeShortestEdge, pad_to_divisible
from odise_pl.data.vocab import Vocabulary, dataset_vocab, load_vocab_file, parse_vocab_string
from odise_pl.errors import VocabularyError, report_user_error
from odise_pl.fs import check_writable_dir


def build_vocabulary(vocab: str | None, vocab_file: str | None, dataset_vocabs: str | None) -> Vocabulary:
    """Union of the given sources, in the order string, file, dataset lists; COCO when none is given."""
    parts: list[Vocabulary] = []
    if vocab is not None:
        parts.append(parse_vocab_string(vocab))
    if vocab_file:
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
    return out


def colours(n: int, seed: int = 0) -> np.ndarray:
    """N distinct-ish RGB colours."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 255, (n, 3)).astype(np.uint8)


def overlay(image: np.ndarray, ids: np.ndarray, segments: list[dict], names: list[str]) -> Image.Image:
    """Blend segment colours over the image and write each segment's name at its centre."""
    out = image.astype(np.float32).copy()
    pal = colours(len(segments) + 1)
    for k, s in enumerate(segments):
        m = ids == s["id"]
        out[m] = 0.45 * out[m] + 0.55 * pal[k]
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for s in segments:
        ys, xs = np.nonzero(ids == s["id"])
        if len(ys):
            text = names[s["category_id"]]
            x, y = int(xs.mean()), int(ys.mean())
            draw.text((x + 1, y + 1), text, fill=(0, 0, 0))
            draw.text((x, y), text, fill=(255, 255, 255))
    return im


def load_model(experiment: str, checkpoint: str | None, overrides: list[str]):
    """(module, cfg) composed like training (``conf/train.yaml``)."""
    import hydra
    from hydra import compose, initialize_config_dir

    from odise_pl.checkpoint import load_trainable
    from odise_pl.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "paths.output_dir=.", *overrides])
    torch.manual_seed(cfg.seed)
    module = hydra.utils.instantiate(cfg.model)
    if checkpoint:
        load_trainable(module.net, checkpoint)
    return module, cfg


def run(args: argparse.Namespace) -> list[dict]:
    """Segment ``args.image``; returns the segment list."""
    vocab = build_vocabulary(args.vocab, args.vocab_file, args.dataset_vocab)
    image = load_image(args.image)
    out_dir = check_writable_dir(args.output)  # before minutes of inference, not after
    module, cfg = load_model(args.experiment, args.checkpoint, args.override)
    net = module.net.eval()
    short = args.short_edge or cfg.data.val_transform.short_edge
    resize = ResizeShortestEdge(short, max(short * 4, 2048))
    h, w = image.shape[:2]
    item = resize({"image": torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)})
    images, sizes = pad_to_divisible([item["image"]], net.size_divisibility)
    predictor = module.make_predictor(mode=args.mode)
    pred = predictor(
        images,
        [{"input_size": sizes[0], "height": h, "width": w}],
        vocab.names,
        vocab.isthing,
        tasks=("panoptic",),
    )[0]
    ids, segments = pred["panoptic"]
    ids = ids.cpu().numpy()
    stem = Path(args.image).stem
    overlay(image, ids, segments, vocab.display_names).save(out_dir / f"{stem}_overlay.png")
    Image.fromarray(ids_to_rgb(ids.astype(np.int64))).save(out_dir / f"{stem}_panoptic.png")
    info = []
    for s in segments:
        k = s["category_id"]
        info.append(
            {
                "id": s["id"],
                "category_id": int(vocab.ids[k]),
                "category": vocab.display_names[k],
                "isthing": int(s["isthing"]),
                "score": round(s["score"], 4),
                "area": int((ids == s["id"]).sum()),
            }
        )
    with open(out_dir / f"{stem}_panoptic.json", "w") as f:
        json.dump(
            {
                "file_name": f"{stem}_panoptic.png",
                "height": h,
                "width": w,
                "segments_info": info,
                "categories": [
                    {"id": i, "name": n[0], "synonyms": n, "isthing": int(t)}
                    for i, n, t in zip(vocab.ids, vocab.names, vocab.isthing)
                ],
            },
            f,
            indent=1,
        )
    print(f"{len(info)} segments ({len(vocab)} categories) -> {out_dir}")
    for s in info:
        print(f"  {s['id']:3d}  {s['category']:<24s} score {s['score']:.3f}  area {s['area']}")
    return info


def positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1 (pixels)")
    return value


def main(argv: list[str] | None = None) -> int:
    """CLI; exit 2 on bad input with a one-line reason."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--vocab", help='categories: "cat;dog,puppy;grass"')
    p.add_argument("--vocab-file", help="openseg-format file (id:name,synonym,...) or one category per line")
    p.add_argument(
        "--dataset-vocab",
        help="shipped vocabularies, comma-separated: coco,ade150,ade847,pc59,pc459,voc21,lvis",
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--checkpoint", help="trained weights (.ckpt or .safetensors)")
    p.add_argument("--experiment", default="tiny", help="experiment config the checkpoint was trained with")
    p.add_argument(
        "--mode", choices=["ensemble", "diffusion", "clip"], help="classification (default: the config's)"
    )
    p.add_argument("--short-edge", type=positive_int, help="resize the shorter side to this before inference")
    p.add_argument(
        "--override", action="append", default=[], help="extra Hydra override, e.g. weights.mode=random"
    )
    args = p.parse_args(argv)
    try:
        run(args)
    except Exception as err:
        if not report_user_error(err):
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
