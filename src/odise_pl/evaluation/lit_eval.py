"""Evaluation through Lightning's test loop: every device of a ``trainer=`` choice, batches > 1,
DataLoader workers; PQ / mIoU / mask AP as torchmetrics ``Metric``s synchronised across processes.
"""

from __future__ import annotations

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from odise_pl.callbacks.progress import StepProgressBar
from odise_pl.datamodule import sharded_loader
from odise_pl.evaluation.runner import compute_evaluators, make_evaluators, update_evaluators
from odise_pl.inference.predictor import Predictor


class EvalDataModule(L.LightningDataModule):
    """One evaluation dataset, each process taking its share of the images (no repeats)."""

    def __init__(self, dataset, batch_size: int = 1, num_workers: int = 2, size_divisibility: int = 64):
        super().__init__()
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.size_divisibility = size_divisibility

    def test_dataloader(self):
        return sharded_loader(
            self.dataset, self.trainer, self.batch_size, self.num_workers, self.size_divisibility
        )


class OpenVocabEvaluation(L.LightningModule):
    """Open-vocabulary inference over a dataset with its vocabulary, scored per ``tasks``.

    Args:
        predictor: the inference settings (its ``net`` becomes this module's, so Lightning places it).
        vocabulary: one synonym list per contiguous category id; ``isthing`` likewise.
        tasks: any of ``panoptic``, ``semantic``, ``instance``.

    After testing: ``results`` holds pq, sq, rq (+ _th, _st), miou, ap, ap50 in %.
    """

    def __init__(
        self,
        predictor: Predictor,
        vocabulary: list[list[str]],
        isthing: list[bool],
        tasks: tuple[str, ...] = ("panoptic", "semantic", "instance"),
    ):
        super().__init__()
        self.net, self.predictor = predictor.net, predictor
        self.vocabulary, self.isthing, self.tasks = vocabulary, list(isthing), tuple(tasks)
        self.evaluators = torch.nn.ModuleDict(make_evaluators(vocabulary, isthing, self.tasks))
        self.results: dict[str, float] = {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        preds = self.predictor(
            batch["images"], batch["meta"], self.vocabulary, self.isthing, tasks=self.tasks
        )
        for pred, target, meta in zip(preds, batch["targets"], batch["meta"]):
            update_evaluators(self.evaluators, pred, target, meta)

    def on_test_epoch_end(self) -> None:
        self.results = compute_evaluators(self.evaluators)  # every process's images (Metric sync)
        for k, v in self.results.items():
            self.log(k, v, sync_dist=False)


def eval_trainer(cfg: DictConfig, callbacks: list | None = None) -> L.Trainer:
    """The ``trainer=`` choice set up for evaluation (and prediction). ``device=auto`` runs a
    single-device CPU trainer (the default) on the GPU when there is one; ``cpu`` / ``cuda`` force it.
    ``callbacks``: instead of the test progress bar.
    """
    overrides: dict = {}
    single = str(cfg.trainer.get("devices", 1)) == "1" and "strategy" not in cfg.trainer
    if cfg.device == "cuda" or (cfg.device == "auto" and single and torch.cuda.is_available()):
        overrides["accelerator"] = "gpu"
    elif cfg.device == "cpu":
        overrides["accelerator"] = "cpu"
    progress = StepProgressBar(refresh_rate=1, log_every=0)  # the test bar: images / s, ETA
    return hydra.utils.instantiate(
        cfg.trainer,
        logger=False,
        callbacks=callbacks if callbacks is not None else [progress],
        enable_checkpointing=False,
        enable_model_summary=False,
        **overrides,
    )


def model_from_checkpoint(cfg: DictConfig, config_name: str):
    """(cfg, LightningModule in eval mode, description or None): the model ``cfg.ckpt_path`` describes
    (or ``cfg``'s own without a self-describing file), its checkpoint read once, checked as data and
    loaded; what evaluation and prediction both start with.
    """
    from odise_pl.checkpoints import load_trainable, read_checkpoint_file, resolve_from_checkpoint
    from odise_pl.config import check_config

    ckpt = read_checkpoint_file(cfg.ckpt_path, trust=cfg.trust_checkpoint_config) if cfg.ckpt_path else None
    desc = ckpt.description if ckpt else None
    cfg = resolve_from_checkpoint(cfg, desc, cfg.ckpt_path, config_name)
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    module = hydra.utils.instantiate(cfg.model)
    if ckpt is not None:
        load_trainable(module.net, ckpt)
    module.net.eval()
    return cfg, module, desc
