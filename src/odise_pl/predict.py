"""Segment a whole folder with any vocabulary: ``python -m odise_pl.predict ckpt_path=X input=DIR
output=OUT [vocab=...]`` (``conf/predict.yaml``; the work is :mod:`odise_pl.inference.predict_loop`).

Batched, with data-loader workers, on every device of ``trainer=`` (each image done once), with a
progress bar (images, rate, ETA). Resumable: a rerun skips the images whose files are complete. An
unreadable image is logged, counted and skipped. Ends with ``OUT/predictions.json`` in the COCO
panoptic results format, which ``python -m odise_pl.evaluation.panoptic_quality`` scores directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig

from odise_pl.config import CONFIG_DIR
from odise_pl.data.io import read_json
from odise_pl.data.transforms import ResizeShortestEdge
from odise_pl.data.vocab import Vocabulary, dataset_vocab
from odise_pl.errors import ConfigError, exit_on_user_error
from odise_pl.evaluation.lit_eval import eval_trainer, model_from_checkpoint
from odise_pl.fs import check_writable_dir
from odise_pl.inference.limits import InputLimits
from odise_pl.inference.predict_loop import (
    FolderDataModule,
    FolderDataset,
    FolderPrediction,
    find_images,
    relative_stem,
    write_predictions_json,
)
from odise_pl.inference.segment import build_vocabulary
from odise_pl.log_setup import get_logger

log = get_logger(__name__)


def predict_vocabulary(cfg: DictConfig) -> tuple[Vocabulary, dict[str, int]]:
    """(the vocabulary, image ids by file name) from ``vocab`` / ``vocab_file`` / ``dataset_vocab``
    and ``dataset_json`` (see ``conf/predict.yaml``).
    """
    given = any(cfg.get(k) for k in ("vocab", "vocab_file", "dataset_vocab"))
    vocab = build_vocabulary(cfg.vocab, cfg.vocab_file, cfg.dataset_vocab, InputLimits()) if given else None
    image_ids: dict[str, int] = {}
    if cfg.get("dataset_json"):
        path = Path(cfg.dataset_json)
        data = read_json(path, "dataset JSON", "give a COCO panoptic or instance JSON of these images")
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
            raise ConfigError(f"dataset_json={path} is not a COCO JSON (no 'categories' list)")
        image_ids = {im["file_name"]: im["id"] for im in data.get("images") or [] if "file_name" in im}
        cats = sorted(data["categories"], key=lambda c: c["id"])
        isthing = {c["id"]: bool(c.get("isthing", 1)) for c in cats}
        if vocab is None:
            vocab = Vocabulary(
                [[c["name"]] for c in cats], [c["id"] for c in cats], [isthing[c["id"]] for c in cats]
            )
        elif set(vocab.ids) <= set(isthing):
            vocab.isthing = [isthing[i] for i in vocab.ids]
    return vocab or dataset_vocab("coco"), image_ids


def predict(cfg: DictConfig) -> dict:
    """Segment ``cfg.input`` into ``cfg.output``; returns counts ``{images, skipped, done, failed}``
    (on the first process) and ``seconds`` (the predict loop's wall time, when there was work).
    """
    if not cfg.get("input") or not cfg.get("output"):
        raise ConfigError("give input=DIR|GLOB|LIST_FILE and output=DIR (e.g. input=photos output=segmented)")
    out = check_writable_dir(cfg.output)  # before the model, not after hours of work
    vocab, image_ids = predict_vocabulary(cfg)  # the inputs first: a bad one fails before the model
    base, images = find_images(cfg.input)
    items = [(p, relative_stem(p, base)) for p in images]
    todo = [(p, s) for p, s in items if not (out / "segments" / f"{s}.json").is_file()]
    log.info(
        "%d images (%d already done, skipped), %d categories -> %s",
        len(items),
        len(items) - len(todo),
        len(vocab),
        out,
    )
    cfg, module, desc = model_from_checkpoint(cfg, "predict")
    train_vocab = desc.get("vocabulary") if desc else None
    predictor = module.make_predictor(train_vocab)
    trainer = eval_trainer(cfg, callbacks=[TQDMProgressBar(refresh_rate=1)])
    lit = FolderPrediction(predictor, vocab, out, image_ids, cfg.write.semantic, cfg.write.overlay)
    if todo:
        val = cfg.data.val_transform
        transform = ResizeShortestEdge(cfg.short_edge or val.short_edge, cfg.max_size or val.max_size)
        data = FolderDataModule(
            FolderDataset(todo, transform),
            cfg.loader.batch_size,
            cfg.loader.num_workers,
            module.net.size_divisibility,
        )
        start = time.perf_counter()
        trainer.predict(lit, datamodule=data, return_predictions=False)
        seconds = time.perf_counter() - start
        log.info("%d images in %.1f s (%.2f images/s)", len(todo), seconds, len(todo) / seconds)
    trainer.strategy.barrier()
    counts = {"images": len(items), "skipped": len(items) - len(todo)}
    if trainer.is_global_zero:
        path, written = write_predictions_json(out, [s for _, s in items], vocab)
        failed = sorted((out / "errors").rglob("*.txt")) if (out / "errors").is_dir() else []
        counts.update(done=written, failed=len(failed))
        if todo:
            counts["seconds"] = seconds
        log.info("wrote %s: %d of %d images segmented", path, written, len(items))
        if failed:
            log.warning("%d images could not be read: %s (a rerun retries them)", len(failed), out / "errors")
    return counts


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    predict(cfg)


if __name__ == "__main__":
    main()
