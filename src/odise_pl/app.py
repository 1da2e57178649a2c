"""Web demo, like the official ODISE's Gradio app: ``python -m odise_pl.app [--checkpoint CKPT ...]``.

Upload an image, type a vocabulary (``;`` between categories, ``,`` between synonyms) and/or pick
COCO / ADE-150 / LVIS, choose a checkpoint, and get the overlay, a legend of the segments with
their categories, and the panoptic PNG + JSON to download. Out of the box it runs on CPU with the
tiny model (random trainable weights unless a ``make train`` checkpoint is found under
``outputs/``). Bad input (no image, empty vocabulary, an image over ``--max-pixels``) is a message
in the page, never a stack trace. The segmentation itself is :mod:`odise_pl.inference.segment`.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import sys
import tempfile
from pathlib import Path

from odise_pl.data.io import load_image
from odise_pl.errors import OdiseError, say_error
from odise_pl.inference.segment import build_vocabulary, load_model, segment_image, write_outputs
from odise_pl.logs import configure_cli, get_logger
from odise_pl.visualize import colours

log = get_logger(__name__)

DATASET_VOCABS = {"COCO (133)": "coco", "ADE20K-150": "ade150", "LVIS (1203)": "lvis"}
RANDOM = "none: random trainable weights"


class InputError(OdiseError, ValueError):
    """Something the person at the page can fix."""


def find_checkpoints(root: str | Path = "outputs") -> list[Path]:
    """``last.ckpt`` of each training run under ``root``, newest first."""
    found = [p for p in Path(root).glob("train/*/checkpoints/last.ckpt") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def legend_html(info: list[dict]) -> str:
    """The segments as an HTML table (colour as in the overlay, id, category, score, area)."""
    pal = colours(len(info) + 1)
    rows = "".join(
        "<tr class='segment'>"
        f"<td><span style='display:inline-block;width:1em;height:1em;background:rgb{tuple(int(c) for c in pal[k])}'>"
        "</span></td>"
        f"<td>{s['id']}</td><td class='category'>{html.escape(s['category'])}</td>"
        f"<td>{s['score']:.3f}</td><td>{s['area']}</td></tr>"
        for k, s in enumerate(info)
    )
    if not info:
        rows = "<tr><td colspan='5'>no segment above the confidence threshold</td></tr>"
    head = "<tr><th></th><th>id</th><th>category</th><th>score</th><th>area (px)</th></tr>"
    return f"<table id='legend-table'>{head}{rows}</table>"


class Segmenter:
    """What the page calls: checkpoints by label (each model built once), one image per request.

    Args:
        checkpoints: label -> checkpoint path (``None``: random trainable weights).
        experiment: the experiment of checkpoints that do not describe themselves (default tiny).
        max_pixels: larger uploads are refused with a message (the web demo's memory guard).
        short_edge: the network's input size (default: the experiment's evaluation size).
        out_root: where each request's PNG / JSON are written for download.
    """

    def __init__(
        self,
        checkpoints: dict[str, str | None],
        experiment: str | None = None,
        max_pixels: int = 16_000_000,
        short_edge: int | None = None,
        out_root: str | Path | None = None,
    ):
        self.checkpoints, self.experiment = checkpoints, experiment
        self.max_pixels, self.short_edge = max_pixels, short_edge
        self.out_root = Path(out_root or tempfile.mkdtemp(prefix="odise_app_"))
        self._models: dict[str, tuple] = {}
        self._count = 0

    def model(self, label: str):
        if label not in self.checkpoints:
            raise InputError(f"unknown checkpoint {label!r}; choose one of the list")
        if label not in self._models:
            log.info("loading %s", label)
            self._models[label] = load_model(self.experiment, self.checkpoints[label])
        return self._models[label]

    def __call__(self, image_path: str | None, vocab_text: str, datasets: list[str], checkpoint: str):
        """-> (overlay PNG path, legend HTML, [panoptic PNG path, JSON path])."""
        if not image_path:
            raise InputError("Upload an image first.")
        text = (vocab_text or "").strip()
        codes = [DATASET_VOCABS[d] for d in datasets or [] if d in DATASET_VOCABS]
        if not text and not codes:
            raise InputError(
                "The vocabulary is empty: type categories (e.g. 'cat; dog, puppy; grass') or tick a dataset vocabulary."
            )
        vocab = build_vocabulary(text or None, None, ",".join(codes) or None)
        image = load_image(image_path)
        h, w = image.shape[:2]
        if h * w > self.max_pixels:
            raise InputError(
                f"The image is {w}x{h} = {h * w / 1e6:.1f} MPixels, over this demo's limit of "
                f"{self.max_pixels / 1e6:.1f}: downscale it (or start the app with a larger --max-pixels)."
            )
        module, cfg = self.model(checkpoint)
        ids, segments = segment_image(
            module, image, vocab, short_edge=self.short_edge or cfg.data.val_transform.short_edge
        )
        self._count += 1
        out = self.out_root / f"{self._count:05d}"
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(image_path).stem or "image"
        info = write_outputs(out, stem, image, ids, segments, vocab)
        log.info("%s: %d segments, %d categories", stem, len(info), len(vocab))
        files = [str(out / f"{stem}_panoptic.png"), str(out / f"{stem}_panoptic.json")]
        return str(out / f"{stem}_overlay.png"), legend_html(info), files


def build_app(segmenter: Segmenter):
    """The Gradio Blocks page around ``segmenter``."""
    import gradio as gr

    def run(image_path, vocab_text, datasets, checkpoint):
        try:
            return segmenter(image_path, vocab_text, datasets, checkpoint)
        except OdiseError as err:  # the user's to fix: the message, in the page
            raise gr.Error(str(err)) from None
        except Exception as err:  # a bug: the page says so; the traceback goes to the server's log
            log.exception("segmentation failed")
            raise gr.Error(
                f"Internal error ({type(err).__name__}); the server log has the details."
            ) from None

    labels = list(segmenter.checkpoints)
    with gr.Blocks(title="ODISE: open-vocabulary panoptic segmentation") as app:
        gr.Markdown(
            "# ODISE: open-vocabulary panoptic segmentation\n"
            "Upload an image, name the categories to find (`;` between categories, `,` between "
            "synonyms) and/or tick dataset vocabularies, then **Segment**."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="image", elem_id="image")
                vocab = gr.Textbox(
                    label="vocabulary", placeholder="cat; dog, puppy; grass; sky", elem_id="vocabulary"
                )
                datasets = gr.CheckboxGroup(
                    list(DATASET_VOCABS), label="dataset vocabularies", elem_id="datasets"
                )
                checkpoint = gr.Dropdown(labels, value=labels[0], label="checkpoint", elem_id="checkpoint")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                result = gr.Image(type="filepath", label="segments", elem_id="overlay", interactive=False)
                legend = gr.HTML(elem_id="legend")
                files = gr.File(
                    label="panoptic PNG + JSON (COCO format)", file_count="multiple", elem_id="files"
                )
        button.click(run, inputs=[image, vocab, datasets, checkpoint], outputs=[result, legend, files])
    return app


def main(argv: list[str] | None = None) -> int:
    """CLI: build the checkpoint list, start the server (Ctrl-C stops it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", action="append", default=[], help="a .ckpt / .safetensors to offer (repeatable)"
    )
    p.add_argument("--experiment", help="experiment of checkpoints without a stored config (default tiny)")
    p.add_argument("--outputs", default="outputs", help="also offer the runs' last.ckpt found here")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-pixels", type=int, default=16_000_000, help="refuse larger uploads with a message")
    p.add_argument("--short-edge", type=int, help="network input size (default: the experiment's)")
    a = p.parse_args(argv)
    configure_cli()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks, per request
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline-first: no calls home
    missing = [c for c in a.checkpoint if not Path(c).is_file()]
    if missing:
        say_error(f"checkpoint not found: {missing[0]}")
        return 2
    found = [str(c) for c in a.checkpoint] + [str(c) for c in find_checkpoints(a.outputs)]
    checkpoints: dict[str, str | None] = {c: c for c in dict.fromkeys(found)}
    checkpoints[RANDOM] = None
    segmenter = Segmenter(checkpoints, a.experiment, a.max_pixels, a.short_edge)
    log.info("checkpoints offered: %s", ", ".join(checkpoints))
    build_app(segmenter).launch(server_name=a.host, server_port=a.port, show_error=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
