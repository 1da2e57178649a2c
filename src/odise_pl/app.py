"""Web demo, like the official ODISE's Gradio app: ``python -m odise_pl.app [--checkpoint CKPT ...]``.

Upload an image, type a vocabulary (``;`` between categories, ``,`` between synonyms) and/or pick
COCO / ADE-150 / LVIS, choose a checkpoint, and get the overlay, a legend of the segments with
their categories, and the panoptic PNG + JSON to download. Out of the box it runs on CPU with the
tiny model (random trainable weights unless a ``make train`` checkpoint is found under
``outputs/``). The segmentation itself is :mod:`odise_pl.inference.segment`.

Meant to be served (``--host 0.0.0.0``), it holds up against hostile requests: every request is
bounded (:class:`~odise_pl.inference.limits.InputLimits`: vocabulary characters, categories,
synonyms, words per name, characters per word, image pixels read from the header before decoding,
a time budget), each refusal is one message in the page and one log line (no traceback); the
text-embedding cache is bounded by bytes (``--vocab-cache-mb``); the outputs of only the last
``--keep-requests`` requests stay on disk, Gradio's uploads and cache live in the app's own
temporary folder, swept every minute and removed at shutdown (Ctrl-C or SIGTERM). A checkpoint's
stored config is data (:mod:`odise_pl.checkpoints.trust`) unless ``--trust-checkpoint-config``.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from odise_pl.data.io import image_size, load_image
from odise_pl.errors import DatasetError, OdiseError, say_error
from odise_pl.inference.limits import Deadline, InputLimits
from odise_pl.inference.segment import build_vocabulary, load_model, segment_image, write_outputs
from odise_pl.log_setup import configure_cli, get_logger
from odise_pl.visualize import colours

log = get_logger(__name__)

DATASET_VOCABS = {"COCO (133)": "coco", "ADE20K-150": "ade150", "LVIS (1203)": "lvis"}
RANDOM = "none: random trainable weights"
# A served page's defaults: tighter than the library's (one request must not hold the queue).
WEB_LIMITS = InputLimits(max_vocab_chars=200_000, max_categories=5_000, timeout_s=60.0)


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
        limits: what one request may ask (:data:`WEB_LIMITS` by default).
        short_edge: the network's input size (default: the experiment's evaluation size).
        out_root: where each request's PNG / JSON are written for download.
        keep_requests: the outputs of this many most recent requests stay on disk (older ones are
            removed: Gradio has copied them into its cache by then).
        vocab_cache_mb: the model's text-embedding cache (``model.net.vocab_cache_mb``).
        trust_config: build whatever a checkpoint's stored config names (only for files you trust).
    """

    def __init__(
        self,
        checkpoints: dict[str, str | None],
        experiment: str | None = None,
        limits: InputLimits = WEB_LIMITS,
        short_edge: int | None = None,
        out_root: str | Path | None = None,
        keep_requests: int = 16,
        vocab_cache_mb: float = 256,
        trust_config: bool = False,
    ):
        self.checkpoints, self.experiment = checkpoints, experiment
        self.limits, self.short_edge = limits, short_edge
        self.out_root = Path(out_root or tempfile.mkdtemp(prefix="odise_app_"))
        self.keep_requests, self.vocab_cache_mb = max(1, keep_requests), vocab_cache_mb
        self.trust_config = trust_config
        self._models: dict[str, tuple] = {}
        self._count = 0

    def model(self, label: str):
        if label not in self.checkpoints:
            raise InputError(f"unknown checkpoint {label!r}; choose one of the list")
        if label not in self._models:
            log.info("loading %s", label)
            self._models[label] = load_model(
                self.experiment,
                self.checkpoints[label],
                [f"model.net.vocab_cache_mb={self.vocab_cache_mb}"],
                trust_config=self.trust_config,
            )
        return self._models[label]

    def read_image(self, image_path: str):
        """The upload, its size checked from the header before its pixels are decoded."""
        name = Path(image_path).name
        try:
            width, height = image_size(image_path)
        except DatasetError:
            raise InputError(
                f"{name!r} is not an image this demo reads: upload a PNG, JPEG, WebP, BMP or TIFF file."
            ) from None
        self.limits.check_pixels(width, height)
        try:
            return load_image(image_path)
        except DatasetError:
            raise InputError(
                f"{name!r} could not be decoded (a truncated or damaged file?): upload it again or another one."
            ) from None

    def __call__(self, image_path: str | None, vocab_text: str, datasets: list[str], checkpoint: str):
        """-> (overlay PNG path, legend HTML, [panoptic PNG path, JSON path])."""
        deadline = Deadline(self.limits)
        if not image_path:
            raise InputError("Upload an image first.")
        text = (vocab_text or "").strip()
        codes = [DATASET_VOCABS[d] for d in datasets or [] if d in DATASET_VOCABS]
        if not text and not codes:
            raise InputError(
                "The vocabulary is empty: type categories (e.g. 'cat; dog, puppy; grass') or tick a dataset vocabulary."
            )
        vocab = build_vocabulary(text or None, None, ",".join(codes) or None, self.limits)
        image = self.read_image(image_path)
        module, cfg = self.model(checkpoint)
        # The vocabulary's text embeddings first, in chunks, with the deadline checked between them
        # (the inference below finds them in the model's cache).
        mode = cfg.model.predictor.mode
        for side in ("diffusion", "clip"):
            if mode in (side, "ensemble"):
                module.net.text_embeddings(vocab.names, side, check=deadline.check)
        deadline.check("inference")
        ids, segments = segment_image(
            module, image, vocab, short_edge=self.short_edge or cfg.data.val_transform.short_edge
        )
        out = self._request_folder()
        stem = Path(image_path).stem or "image"
        info = write_outputs(out, stem, image, ids, segments, vocab)
        log.info("%s: %d segments, %d categories", stem, len(info), len(vocab))
        files = [str(out / f"{stem}_panoptic.png"), str(out / f"{stem}_panoptic.json")]
        return str(out / f"{stem}_overlay.png"), legend_html(info), files

    def _request_folder(self) -> Path:
        """A new folder for this request's files; those of all but the last ``keep_requests`` are removed."""
        self._count += 1
        out = self.out_root / f"{self._count:07d}"
        out.mkdir(parents=True, exist_ok=True)
        old = sorted(p for p in self.out_root.iterdir() if p.is_dir() and p.name.isdigit())
        for stale in old[: max(0, len(old) - self.keep_requests)]:
            shutil.rmtree(stale, ignore_errors=True)
        return out


def build_app(segmenter: Segmenter, delete_cache: tuple[int, int] = (60, 600)):
    """The Gradio Blocks page around ``segmenter``. ``delete_cache``: (every, older than) seconds,
    Gradio's sweep of the uploads and served files in its cache.
    """
    import gradio as gr

    def run(image_path, vocab_text, datasets, checkpoint):
        try:
            return segmenter(image_path, vocab_text, datasets, checkpoint)
        except OdiseError as err:  # the user's to fix: the message in the page, one line in the log
            log.info("refused: %s", str(err).splitlines()[0][:300])
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # a bug: the page says so; the traceback goes to the server's log
            log.exception("segmentation failed")
            raise gr.Error(
                f"Internal error ({type(err).__name__}); the server log has the details.",
                print_exception=False,
            ) from None

    labels = list(segmenter.checkpoints)
    with gr.Blocks(title="ODISE: open-vocabulary panoptic segmentation", delete_cache=delete_cache) as app:
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
        button.click(
            run,
            inputs=[image, vocab, datasets, checkpoint],
            outputs=[result, legend, files],
            api_name="segment",
        )
    return app


def main(argv: list[str] | None = None) -> int:
    """CLI: build the checkpoint list, start the server (Ctrl-C or SIGTERM stops it and removes its
    temporary folder).
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", action="append", default=[], help="a .ckpt / .safetensors to offer (repeatable)"
    )
    p.add_argument("--experiment", help="experiment of checkpoints without a stored config (default tiny)")
    p.add_argument("--outputs", default="outputs", help="also offer the runs' last.ckpt found here")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--short-edge", type=int, help="network input size (default: the experiment's)")
    p.add_argument("--keep-requests", type=int, default=16, help="requests whose files stay on disk")
    p.add_argument(
        "--vocab-cache-mb", type=float, default=256, help="text embeddings of recent vocabularies kept"
    )
    p.add_argument(
        "--trust-checkpoint-config",
        action="store_true",
        help="build whatever model classes a checkpoint's stored config names (only for files you trust)",
    )
    InputLimits.add_arguments(p, WEB_LIMITS)
    a = p.parse_args(argv)
    configure_cli()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks, per request
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline-first: no calls home
    try:
        limits = InputLimits.from_args(a)
    except OdiseError as err:
        say_error(str(err))
        return 2
    missing = [c for c in a.checkpoint if not Path(c).is_file()]
    if missing:
        say_error(f"checkpoint not found: {missing[0]}")
        return 2
    found = [str(c) for c in a.checkpoint] + [str(c) for c in find_checkpoints(a.outputs)]
    checkpoints: dict[str, str | None] = {c: c for c in dict.fromkeys(found)}
    checkpoints[RANDOM] = None
    # Everything this server writes (request outputs, Gradio's uploads and cache) in one folder,
    # removed at shutdown.
    root = Path(tempfile.mkdtemp(prefix="odise_app_"))
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    segmenter = Segmenter(
        checkpoints,
        a.experiment,
        limits,
        a.short_edge,
        root / "requests",
        a.keep_requests,
        a.vocab_cache_mb,
        a.trust_checkpoint_config,
    )
    log.info("checkpoints offered: %s", ", ".join(checkpoints))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a service manager's stop: clean up too
    try:
        build_app(segmenter).launch(server_name=a.host, server_port=a.port, show_error=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        log.info("removed %s", root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
