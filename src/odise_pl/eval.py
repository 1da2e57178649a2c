"""Evaluate a trained ODISE: ``python -m odise_pl.eval ckpt_path=PATH [datasets=[ade150,coco]]``.

For each dataset: open-vocabulary inference with its vocabulary, then PQ / mIoU / mask AP (per the
dataset's tasks); prints a Markdown table with the paper's numbers (Tables 1-2) beside ours and
writes ``results.md`` and ``results.json`` to the run folder.
"""

from __future__ import annotations

import json

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from odise_pl.config import CONFIG_DIR
from odise_pl.data.transforms import ResizeShortestEdge
from odise_pl.data.vocab import Vocabulary, dataset_vocab
from odise_pl.errors import exit_on_user_error
from odise_pl.evaluation.lit_eval import (
    EvalDataModule,
    OpenVocabEvaluation,
    eval_trainer,
    model_from_checkpoint,
)
from odise_pl.fs import check_writable_dir
from odise_pl.inference.predictor import Predictor
from odise_pl.log_setup import get_logger

log = get_logger(__name__)

COLUMNS = (("pq", "PQ"), ("pq_th", "PQ th"), ("pq_st", "PQ st"), ("ap", "AP"), ("miou", "mIoU"))


def dataset_vocabulary(entry: DictConfig, dataset) -> Vocabulary:
    """The vocabulary of an evaluation dataset, aligned with its contiguous category order."""
    if entry.get("vocabulary") is None:
        return Vocabulary([[n] for n in dataset.class_names], isthing=list(dataset.isthing))
    vocab = dataset_vocab(entry.vocabulary)
    if hasattr(dataset, "categories"):  # panoptic: categories sorted by id <-> vocabulary sorted by id
        if len(dataset.categories) != len(vocab):
            raise ValueError(
                f"{entry.title}: the dataset has {len(dataset.categories)} categories, vocabulary "
                f"{entry.vocabulary!r} {len(vocab)}; they must describe the same classes"
            )
        order = sorted(range(len(vocab)), key=lambda k: vocab.ids[k])
        vocab = Vocabulary(
            [vocab.names[k] for k in order],
            [vocab.ids[k] for k in order],
            list(dataset.isthing),
            strict=False,
        )
    else:  # semantic: label k <-> k-th vocabulary entry
        dataset.num_classes = len(vocab)
        dataset.isthing = list(vocab.isthing)
    return vocab


def evaluate_dataset(
    trainer: L.Trainer,
    predictor: Predictor,
    entry: DictConfig,
    loader: DictConfig,
    max_images: int | None,
    divisibility: int,
    train_vocab: list[list[str]] | None = None,
) -> dict:
    """Run one dataset entry of ``conf/datasets`` through Lightning's test loop; returns metrics in %.

    Seen categories (Eq. 10) are ``train_vocab``'s; without one, a dataset evaluated with its own
    category names (vocabulary null, e.g. the training set's val split) counts as all seen.
    ``loader``: ``batch_size`` and ``num_workers`` (images of a batch are padded to a common size,
    as detectron2 batches them: batch 1 is the reference setting).
    """
    transform = ResizeShortestEdge(entry.short_edge, entry.max_size)
    dataset = hydra.utils.instantiate(entry.dataset, transform=transform)
    vocab = dataset_vocabulary(entry, dataset)
    predictor.train_vocabulary = (
        train_vocab if train_vocab is not None else (vocab.names if entry.get("vocabulary") is None else None)
    )
    if max_images:
        dataset.items = dataset.items[:max_images]
    module = OpenVocabEvaluation(predictor, vocab.names, vocab.isthing, tuple(entry.tasks))
    data = EvalDataModule(dataset, loader.batch_size, loader.num_workers, divisibility)
    log.info("%s: %d images, %d categories", entry.title, len(dataset), len(vocab))
    trainer.test(module, datamodule=data, verbose=False)
    return module.results


def results_table(results: dict, papers: dict, supervision: str) -> str:
    """Markdown: one row per dataset, ours (paper) per metric."""
    head = "| dataset | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for title, metrics in results.items():
        paper = papers.get(title, {}).get(supervision, {}) or {}
        cells = []
        for key, _ in COLUMNS:
            if key not in metrics:
                cells.append("")
                continue
            cell = f"{metrics[key]:.1f}"
            if key in paper:
                cell += f" ({paper[key]:.1f})"
            cells.append(cell)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines.append(f"\nours (paper, {supervision} supervision: Tables 1-2)")
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict:
    """Build the model from ``cfg`` (or from the checkpoint's own description), load the
    checkpoint, evaluate every dataset; results are written by the first process.
    """
    out = check_writable_dir(cfg.paths.output_dir)  # before the evaluation, not after it
    cfg, module, desc = model_from_checkpoint(cfg, "eval")
    trainer = eval_trainer(cfg)
    net = module.net
    source = cfg.get("train_vocabulary") or module.train_vocabulary
    if cfg.get("train_vocabulary") is None and desc and desc.get("vocabulary"):
        train_vocab = desc["vocabulary"]  # exactly what the checkpoint was trained on
    else:
        train_vocab = None if source == "dataset" else dataset_vocab(source).names
    predictor = module.make_predictor(train_vocab)
    results, papers = {}, {}
    for entry in cfg.datasets.values():
        results[entry.title] = evaluate_dataset(
            trainer, predictor, entry, cfg.loader, cfg.get("max_images"), net.size_divisibility, train_vocab
        )
        papers[entry.title] = OmegaConf.to_container(entry.paper, resolve=True)
    table = results_table(results, papers, module.supervision)
    if trainer.is_global_zero:
        log.info("%s", table)
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(
            json.dumps(
                {
                    "results": results,
                    "paper": papers,
                    "ckpt_path": cfg.ckpt_path,
                    "processes": trainer.world_size,
                },
                indent=2,
                default=float,
            )
        )
        log.info("wrote %s and %s", out / "results.md", out / "results.json")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
