"""LightningModule: wires model, losses, optimiser, inference and trainable-only checkpoints.

It computes nothing of the method itself: the model (``model/``), the losses (``loss/``), the
optimiser set-up (``optim.py``) and inference (``inference/``) do; run guards are callbacks
(``callbacks/``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from odise_pl.checkpoints.hooks import TrainableOnlyCheckpoints
from odise_pl.data.vocab import dataset_vocab, training_vocabulary
from odise_pl.evaluation.runner import compute_evaluators, make_evaluators, update_evaluators
from odise_pl.inference.predictor import Predictor
from odise_pl.loss.criterion import SetCriterion
from odise_pl.loss.global_batch import average_gradients, global_batch_step
from odise_pl.loss.grounding import GroundingLoss
from odise_pl.loss.odise_loss import ODISELoss
from odise_pl.model.odise import ODISE, to_unit
from odise_pl.optim import param_groups


class ODISELitModule(TrainableOnlyCheckpoints, L.LightningModule):
    """Training / validation of ODISE.

    Args:
        net: the :class:`ODISE` model.
        criterion, grounding: the losses, composed by :class:`~odise_pl.loss.odise_loss.ODISELoss`.
        supervision: ``label`` (category cross-entropy, Eq. 5) or ``caption`` (grounding loss, Eq. 8).
        train_vocabulary: the categories trained on and counted as seen at test time: a shipped
            vocabulary (PARITY: ``coco``, the COCO panoptic synonym lists matched to the dataset's
            categories by id) or ``dataset`` (the training set's own names).
        optimizer, scheduler: partials of the optimiser (given parameter groups) and of a step-wise
            scheduler (given the optimiser; the official one: :class:`odise_pl.optim.WarmupMultiStepLR`).
        weight_decay_norm, weight_decay_bias: weight decay of normalisation layers and biases
            (PARITY: 0, detectron2's groups; ``None``: the optimiser's).
        predictor: partial of :class:`~odise_pl.inference.predictor.Predictor` (the test-time settings).
    """

    def __init__(
        self,
        *,
        net: ODISE,
        criterion: SetCriterion,
        grounding: GroundingLoss,
        supervision: Literal["label", "caption"] = "label",
        train_vocabulary: str = "coco",
        optimizer: Callable,
        scheduler: Callable,
        weight_decay_norm: float | None = 0.0,
        weight_decay_bias: float | None = 0.0,
        predictor: Callable[..., Predictor] = Predictor,
    ):
        super().__init__()
        self.net, self.supervision, self.train_vocabulary = net, supervision, train_vocabulary
        objectness = getattr(net.transformer_decoder, "class_embed", None) is not None
        self.loss = ODISELoss(
            criterion=criterion, grounding=grounding, supervision=supervision, objectness=objectness
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay_norm, self.weight_decay_bias = weight_decay_norm, weight_decay_bias
        self.predictor_factory = predictor
        self.strict_loading = False  # frozen parts are out of the checkpoint
        self.vocabulary: list[list[str]] | None = None
        self.isthing: list[bool] | None = None
        self.evaluators = torch.nn.ModuleDict()
        self.nonfinite_terms: list[str] = []  # of the last skipped step (callbacks.nonfinite reports them)
        self.description: dict | None = None  # odise_pl.checkpoints.describe(cfg), set by train
        self._step_batches: list[dict] = []  # the micro-batches of the step being accumulated
        self.step_skipped = False  # whether the last training_step skipped a step (callbacks.nonfinite)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and self.vocabulary is None:
            self.set_vocabulary(training_vocabulary(self.train_vocabulary, dm.categories), dm.isthing)
        if stage == "fit" and self._accumulating_under_ddp():
            # We synchronise gradients ourselves (on_train_start): DDP's reducer never runs, and its
            # static-graph mode, which expects it to, is not needed (set before DDP wraps the model).
            ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
            if ddp_kwargs and ddp_kwargs.get("static_graph"):
                ddp_kwargs["static_graph"] = False

    def _accumulating_under_ddp(self) -> bool:
        return (
            self._trainer is not None
            and self.trainer.world_size > 1
            and self.trainer.accumulate_grad_batches > 1
        )

    def set_vocabulary(self, vocabulary: list[list[str]], isthing: list[bool]) -> None:
        """Categories for label supervision and validation (contiguous ids = list positions)."""
        self.vocabulary, self.isthing = vocabulary, list(isthing)
        # a ModuleDict of torchmetrics Metrics: moved to the module's device, synchronised in compute
        self.evaluators = torch.nn.ModuleDict(make_evaluators(vocabulary, isthing))

    # -- training ------------------------------------------------------------------------------
    def forward_batch(self, batch: dict) -> tuple[dict, Tensor | None]:
        """The model's outputs for a batch (classified for label supervision) and, for caption
        supervision, its captions' word embeddings (B, K, D).
        """
        outputs = self.net(to_unit(batch["images"]), batch.get("captions"))
        if self.supervision == "label":
            self.net.classify(outputs, *self.net.text_embeddings(self.vocabulary))
        words = (
            self.net.word_embeddings(batch["words"])
            if "words" in batch and self.supervision == "caption"
            else None
        )
        return outputs, words

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        """The loss terms of one batch taken as a whole step (no accumulation)."""
        outputs, words = self.forward_batch(batch)
        return self.loss(
            outputs, batch["targets"], words, self.net.classifier.scale, batch.get("words_valid")
        )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Under gradient accumulation Lightning hands over one micro-batch at a time: they are kept
        until the step's last one, then the step's losses are computed over all of them
        (:func:`~odise_pl.loss.global_batch.global_batch_step`: global normalisers and, for
        caption supervision, the grounding loss over the whole global batch), back-propagating
        every micro-batch but the last, whose loss Lightning's closure back-propagates.

        A kept micro-batch, and a step skipped for a non-finite loss, return a zero loss through
        every trainable parameter rather than None: Lightning refuses None under DDP, and DDP's
        gradient synchronisation expects every parameter in the graph. A skipped step's gradients
        are then dropped before the optimiser sees them (:meth:`on_before_optimizer_step`).
        """
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        self._step_batches.append(batch)
        self.step_skipped = False
        if (batch_idx + 1) % accumulate:
            return self._zero_loss()  # Lightning zeroes the gradients before back-propagating it
        micro_batches, self._step_batches = self._step_batches, []
        step = global_batch_step(
            self.loss,
            micro_batches,
            self.forward_batch,
            backward=lambda loss: self.trainer.strategy.backward(loss, None),
            scale=self.net.classifier.scale,
            num_queries=self.net.transformer_decoder.query_feat.num_embeddings,
            all_finite=self._all_finite,
        )
        if step is None:  # skip: no update (callbacks.nonfinite counts and stops)
            self.step_skipped = True
            return self._zero_loss()
        total = sum(step.terms.values())
        bs = sum(mb["images"].shape[0] for mb in micro_batches)
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for k, v in step.terms.items():
            if not k.rsplit("_", 1)[-1].isdigit():  # final-set terms only; aux sets are in train/loss
                self.log(f"train/{k}", v, batch_size=bs)
        self.log("train/logit_scale", self.net.classifier.scale.detach(), batch_size=bs)
        # Lightning divides what it back-propagates by the accumulation steps; the step's terms
        # are already normalised over the global batch.
        return step.last * accumulate

    def _zero_loss(self) -> Tensor:
        return sum((p * 0).sum() for p in self.parameters() if p.requires_grad)

    def on_train_start(self) -> None:
        # Under accumulation a step's micro-batches are back-propagated inside one training_step,
        # i.e. inside one DDP forward, which DDP's reducer cannot follow (with static_graph it
        # fails): DDP is told never to synchronise, and the step's gradients are averaged here,
        # once, before clipping and the update (on_before_optimizer_step).
        self._sync_gradients = False
        if self._accumulating_under_ddp():
            ddp = self.trainer.strategy.model
            if hasattr(ddp, "require_backward_grad_sync"):
                ddp.require_backward_grad_sync = False
                self._sync_gradients = True

    def on_before_optimizer_step(self, optimizer) -> None:
        if getattr(self, "_sync_gradients", False) and not self.step_skipped:
            # Non-finite after averaging (fp16: an overflow on another process, which its gradient
            # scaler saw and this one's did not): skipped on every process alike.
            self.step_skipped = not average_gradients([p for p in self.parameters() if p.grad is not None])
        if self.step_skipped:  # no gradient, no update: the optimiser passes over every parameter
            for p in self.parameters():
                p.grad = None

    def _all_finite(self, terms: dict[str, Tensor]) -> bool:
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v))]
        nonfinite = bool(bad)
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every process must skip together, or DDP's gradient all-reduce would hang.
            nonfinite = self.trainer.strategy.reduce_boolean_decision(nonfinite, all=False)
        if nonfinite:
            self.nonfinite_terms = bad or ["(on another process)"]
        return not nonfinite

    def configure_optimizers(self):
        opt = self.optimizer_factory(
            params=param_groups(self, self.weight_decay_norm, self.weight_decay_bias)
        )
        scheduler = self.scheduler_factory(opt)
        # Before a resumed run's state overwrites them (callbacks: ConfiguredOptimizerOnResume).
        self.configured_optimizer = [(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- inference and validation ----------------------------------------------------------------
    def make_predictor(self, train_vocabulary: list[list[str]] | None = None, **overrides) -> Predictor:
        """Open-vocabulary inference with this model's settings (validation, eval and demo share it);
        ``train_vocabulary``: the categories counted as seen (default: :meth:`seen_vocabulary`);
        ``overrides``: any :class:`Predictor` argument (e.g. ``mode``, ``precision``).
        """
        seen = self.seen_vocabulary() if train_vocabulary is None else train_vocabulary
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.predictor_factory(self.net, **{"train_vocabulary": seen, **given})

    def seen_vocabulary(self) -> list[list[str]] | None:
        """The training vocabulary once a datamodule resolved it, else the shipped one
        ``train_vocabulary`` names (``None`` for ``dataset`` without data).
        """
        if self.vocabulary is not None:
            return self.vocabulary
        return None if self.train_vocabulary == "dataset" else dataset_vocab(self.train_vocabulary).names

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        preds = self.make_predictor()(
            batch["images"], batch["meta"], self.vocabulary, self.isthing, batch.get("captions")
        )
        for pred, tgt, meta in zip(preds, batch["targets"], batch["meta"]):
            update_evaluators(self.evaluators, pred, tgt, meta)
        return {"preds": preds}  # for callbacks (e.g. PanopticVisualizer)

    def on_validation_epoch_start(self) -> None:
        for ev in self.evaluators.values():
            ev.reset()

    def on_validation_epoch_end(self) -> None:
        # Evaluators synchronise across processes themselves; the values are already global.
        for k, v in compute_evaluators(self.evaluators).items():
            self.log(f"val/{k}", v, prog_bar=k in ("pq", "miou", "ap"), sync_dist=False)
