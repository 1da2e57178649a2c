"""Segment your own image with any vocabulary (a command line over :mod:`odise_pl.inference.segment`).

``python -m odise_pl.demo --image IMG [--vocab "cat;dog,puppy;grass"] [--vocab-file F]
[--dataset-vocab coco,ade150,lvis] --output OUT_DIR [--checkpoint CKPT] [--experiment NAME]``

Writes ``OUT_DIR/NAME_overlay.png`` (labelled segments over the image), ``NAME_panoptic.png`` +
``NAME_panoptic.json`` (COCO panoptic format; category ids are the vocabulary's) and prints the
segment list. Categories: ``;`` separates them, ``,`` separates synonyms. Without any vocabulary
option the COCO vocabulary is used. With no checkpoint the trainable part is randomly initialised
(fine for trying the pipeline; meaningless segments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from odise_pl.data.io import image_size, load_image
from odise_pl.errors import report_user_error
from odise_pl.fs import check_writable_dir
from odise_pl.inference.limits import InputLimits
from odise_pl.inference.segment import build_vocabulary, load_model, segment_image, write_outputs
from odise_pl.log_setup import configure_cli, get_logger

log = get_logger(__name__)
# A local command: the web demo's vocabulary limits, no pixel limit of its own (Pillow's and
# ODISE_MAX_IMAGE_PIXELS still apply) and no time budget.
DEMO_LIMITS = InputLimits(max_pixels=None, timeout_s=None)


def positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1 (pixels)")
    return value


def run(args: argparse.Namespace) -> list[dict]:
    """Segment ``args.image`` and write the outputs; returns the segment records."""
    limits = InputLimits.from_args(args)
    vocab = build_vocabulary(args.vocab, args.vocab_file, args.dataset_vocab, limits)
    if limits.max_pixels is not None:
        limits.check_pixels(*image_size(args.image), what=f"image {args.image}")
    image = load_image(args.image)
    out_dir = check_writable_dir(args.output)  # before minutes of inference, not after
    module, cfg = load_model(args.experiment, args.checkpoint, args.override, args.trust_checkpoint_config)
    ids, segments = segment_image(
        module, image, vocab, short_edge=args.short_edge or cfg.data.val_transform.short_edge, mode=args.mode
    )
    info = write_outputs(out_dir, Path(args.image).stem, image, ids, segments, vocab)
    log.info("%d segments (%d categories) -> %s", len(info), len(vocab), out_dir)
    for s in info:
        log.info("  %3d  %-24s score %.3f  area %d", s["id"], s["category"], s["score"], s["area"])
    return info


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
    p.add_argument(
        "--trust-checkpoint-config",
        action="store_true",
        help="build whatever model classes the checkpoint's stored config names (only for files you trust)",
    )
    p.add_argument(
        "--experiment",
        help="experiment config of the model (default: the checkpoint's own, stored in it; tiny without one)",
    )
    p.add_argument(
        "--mode", choices=["ensemble", "diffusion", "clip"], help="classification (default: the config's)"
    )
    p.add_argument("--short-edge", type=positive_int, help="resize the shorter side to this before inference")
    p.add_argument(
        "--override", action="append", default=[], help="extra Hydra override, e.g. weights.mode=random"
    )
    InputLimits.add_arguments(p, DEMO_LIMITS)
    args = p.parse_args(argv)
    configure_cli()
    try:
        run(args)
    except Exception as err:
        if not report_user_error(err):
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
