"""LightningModule: wires model, losses, optimiser, metrics and trainable-only checkpoints.

It computes nothing of the method itself: the model (``model/``), the losses (``loss/``) and the
post-processing (``inference/``) do.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from odise_pl.data.vocab import dataset_vocab, training_vocabulary
from odise_pl.errors import ConfigError
from odise_pl.evaluation.runner import compute_evaluators, make_evaluators, update_evaluators
from odise_pl.inference.predictor import Predictor
from odise_pl.loss.criterion import SetCriterion
from odise_pl.loss.grounding import GroundingLoss
from odise_pl.model.odise import ODISE, to_unit
from odise_pl.optim import param_groups


class ODISELitModule(L.LightningModule):
    """Training / validation of ODISE.

    Args:
        net: the :class:`ODISE` model.
        criterion: :class:`SetCriterion` (matching + mask losses, and CE under label supervision).
        grounding: :class:`GroundingLoss` (caption supervision).
        supervision: ``label`` (category cross-entropy, Eq. 5) or ``caption`` (grounding loss, Eq. 8).
        train_vocabulary: the categories the model is trained on and that count as seen at test
            time: a shipped vocabulary (PARITY: ``coco``, the COCO panoptic synonym lists, each
            category matched to the dataset's by id) or ``dataset`` (the training set's own names).
        optimizer: partial of a torch optimiser (AdamW lr 1e-4, wd 0.05), given parameter groups.
        scheduler: partial of a step-wise LR scheduler taking the optimiser (the official schedule:
            :func:`odise_pl.optim.warmup_multistep_lr`).
        weight_decay_norm, weight_decay_bias: weight decay of normalisation layers' parameters and of
            biases (PARITY: 0, detectron2's groups); ``None``: the optimiser's.
        object_mask_threshold, overlap_threshold: panoptic post-processing (0.0 / 0.8).
        open_vocab_mode, ensemble_alpha, ensemble_beta: test-time classification (Eq. 10; ``ensemble``;
            CLIP's weight for seen / novel categories, PARITY: 0.3 / 0.7 label models, 0.35 / 0.65
            caption models; ``diffusion`` / ``clip`` for ablations).
        clip_side, clip_mask_region: CLIP's opinion by MaskCLIP (PARITY) or mask pooling, and the
            mask region MaskCLIP reads (see :class:`~odise_pl.inference.predictor.Predictor`).
        instance_topk: instances kept per image.
        max_nonfinite_steps: a NaN / inf loss skips its step; this many in a row stop training.
        inference_precision: autocast dtype of validation / eval / demo inference (``fp32``: reference).
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
        object_mask_threshold: float = 0.0,
        overlap_threshold: float = 0.8,
        open_vocab_mode: Literal["ensemble", "diffusion", "clip"] = "ensemble",
        ensemble_alpha: float = 0.3,
        ensemble_beta: float = 0.7,
        clip_side: Literal["maskclip", "pooling"] = "maskclip",
        clip_mask_region: Literal["padded", "image"] = "padded",
        instance_topk: int = 100,
        max_nonfinite_steps: int = 5,
        inference_precision: Literal["fp32", "bf16", "fp16"] = "fp32",
    ):
        super().__init__()
        if supervision not in ("label", "caption"):
            raise ValueError(f"supervision must be 'label' or 'caption', got {supervision!r}")
        self.net, self.criterion, self.grounding = net, criterion, grounding
        self.supervision = supervision
        has_objectness = getattr(net.transformer_decoder, "class_embed", None) is not None
        if supervision == "label" and has_objectness:
            raise ConfigError(
                "model.net.transformer_decoder.objectness=true is the caption models' binary head; "
                "label supervision scores no-object with the null embedding: set it to false"
            )
        if supervision == "caption" and not has_objectness:
            warnings.warn(
                "caption supervision without the objectness head: nothing trains the no-object "
                "score (the null embedding), so inference keeps spurious segments. Set "
                "model.net.transformer_decoder.objectness=true (as the caption_* experiments do).",
                stacklevel=2,
            )
        self.train_vocabulary = train_vocabulary
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay_norm, self.weight_decay_bias = weight_decay_norm, weight_decay_bias
        self.clip_side, self.clip_mask_region = clip_side, clip_mask_region
        self.object_mask_threshold, self.overlap_threshold = object_mask_threshold, overlap_threshold
        self.open_vocab_mode, self.ensemble_alpha, self.ensemble_beta = (
            open_vocab_mode,
            ensemble_alpha,
            ensemble_beta,
        )
        self.instance_topk = instance_topk
        # Frozen parts are in eval mode and out of the checkpoint: loading needs no frozen keys.
        self.strict_loading = False
        self.vocabulary: list[list[str]] | None = None
        self.isthing: list[bool] | None = None
        self.evaluators: dict = {}
        self.bad_samples = 0  # skipped with data.on_bad_sample=skip, this process
        self.max_nonfinite_steps = max_nonfinite_steps
        self.inference_precision = inference_precision
        self.nonfinite_in_a_row = self.nonfinite_total = 0

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and self.vocabulary is None:
            self.set_vocabulary(training_vocabulary(self.train_vocabulary, dm.categories), dm.isthing)

    def set_vocabulary(self, vocabulary: list[list[str]], isthing: list[bool]) -> None:
        """Categories for label supervision and validation (contiguous ids = list positions)."""
        self.vocabulary, self.isthing = vocabulary, list(isthing)
        self.evaluators = make_evaluators(vocabulary, isthing)

    # -- training ------------------------------------------------------------------------------
    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        images = to_unit(batch["images"])
        captions = batch.get("captions")
        outputs = self.net(images, captions)
        targets = batch["targets"]
        if self.supervision == "label":
            self.net.classify(outputs, *self.net.text_embeddings(self.vocabulary))
        elif "pred_objectness" in outputs:
            # PARITY with the official caption models: a 1-class problem (every target "object",
            # class 0; unmatched queries "no object"), the same class cost, weights and no-object
            # weight as the category loss.
            for out in [outputs, *outputs.get("aux_outputs", [])]:
                out["pred_logits"] = out["pred_objectness"]
            targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        losses = self.criterion(outputs, targets)
        if self.supervision == "caption":
            if "words" not in batch:
                raise ConfigError(
                    "model.supervision=caption needs captions: set data.k_words > 0 and "
                    "data.train_dataset.captions=true (or a caption_source), or train with model.supervision=label"
                )
            words = self.net.word_embeddings(batch["words"])  # projected by the classifier's text_proj
            scale = self.net.classifier.scale
            sets = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(outputs["aux_outputs"])]
            for suffix, out in sets:
                losses["loss_ground" + suffix] = self.grounding(out["mask_embed"], words, scale)
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.bad_samples += int(batch.get("bad_samples", 0))
        losses = self.compute_losses(batch)
        total = sum(losses.values())
        bs = batch["images"].shape[0]
        nonfinite = not bool(torch.isfinite(total.detach()))
        if self.trainer is not None and self.trainer.world_size > 1:
            # Every process must skip together, or DDP's gradient all-reduce would hang.
            nonfinite = self.trainer.strategy.reduce_boolean_decision(nonfinite, all=False)
        if nonfinite:
            return self._skip_nonfinite(losses, bs)
        self.nonfinite_in_a_row = 0
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            if not k.rsplit("_", 1)[-1].isdigit():  # final-set terms only; aux sets are in train/loss
                self.log(f"train/{k}", v, batch_size=bs)
        self.log("train/logit_scale", self.net.classifier.scale.detach(), batch_size=bs)
        return total

    def _skip_nonfinite(self, losses: dict[str, Tensor], bs: int) -> None:
        """A NaN / inf loss: skip this step (returning None: no backward, no update; Lightning still
        counts the step), log it, stop after too many in a row.
        """
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach())]
        warnings.warn(
            f"step {self.global_step}: non-finite loss terms {bad[:6]}; the step is skipped", stacklevel=2
        )
        self.log("train/nonfinite_steps", float(self.nonfinite_total), batch_size=bs)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (terms {bad[:6]}) at step {self.global_step}: "
                "training stopped. Resume from the last checkpoint with a lower learning rate "
                "(model.optimizer.lr) or check the data; model.max_nonfinite_steps sets the limit."
            )
        return None

    def on_train_end(self) -> None:
        total = torch.tensor(float(self.bad_samples))
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total.to(self.device), reduce_op="sum").cpu()
        if self.trainer.is_global_zero and total > 0:
            print(
                f"skipped {int(total)} bad training samples (data.on_bad_sample=skip); see the warnings above"
            )

    # -- validation ----------------------------------------------------------------------------
    def make_predictor(
        self, train_vocabulary: list[list[str]] | None = None, mode: str | None = None
    ) -> Predictor:
        """Open-vocabulary inference with this module's settings (validation, eval and demo share it).

        ``train_vocabulary``: the categories counted as seen (default: :meth:`seen_vocabulary`).
        """
        return Predictor(
            self.net,
            mode=mode or self.open_vocab_mode,
            alpha=self.ensemble_alpha,
            beta=self.ensemble_beta,
            train_vocabulary=self.seen_vocabulary() if train_vocabulary is None else train_vocabulary,
            clip_side=self.clip_side,
            clip_mask_region=self.clip_mask_region,
            object_mask_threshold=self.object_mask_threshold,
            overlap_threshold=self.overlap_threshold,
            topk=self.instance_topk,
            precision=self.inference_precision,
        )

    def seen_vocabulary(self) -> list[list[str]] | None:
        """The categories seen in training: the resolved training vocabulary once a datamodule set
        it, else the shipped one ``train_vocabulary`` names (``None`` for ``dataset`` without data).
        """
        if self.vocabulary is not None:
            return self.vocabulary
        return None if self.train_vocabulary == "dataset" else dataset_vocab(self.train_vocabulary).names

    @property
    def predictor(self) -> Predictor:
        return self.make_predictor(self.vocabulary)

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        preds = self.predictor(
            batch["images"], batch["meta"], self.vocabulary, self.isthing, batch.get("captions")
        )
        for pred, tgt, meta in zip(preds, batch["targets"], batch["meta"]):
            update_evaluators(self.evaluators, pred, tgt, meta)
        return {"preds": preds}  # for callbacks (e.g. PanopticVisualizer)

    def on_validation_epoch_start(self) -> None:
        for ev in self.evaluators.values():
            ev.reset()

    def on_validation_epoch_end(self) -> None:
        metrics = compute_evaluators(self.evaluators)
        # Evaluators synchronise across processes themselves; the values are already global.
        for k, v in metrics.items():
            self.log(f"val/{k}", v, prog_bar=k in ("pq", "miou", "ap"), sync_dist=False)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = param_groups(self, self.weight_decay_norm, self.weight_decay_bias)
        opt = self.optimizer_factory(params=groups)
        scheduler = self.scheduler_factory(opt)
        # The configured values, before a resumed run's optimizer state overwrites them (on_train_start).
        self._configured = [(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run trains with its own config's learning rate and weight decay: the restored
        optimizer and scheduler state would otherwise keep the checkpoint's (a lower
        ``model.optimizer.lr`` to get past a divergence would be silently ignored).
        """
        opt, sched = self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler
        changed = set()
        for i, (group, (lr, wd)) in enumerate(zip(opt.param_groups, self._configured)):
            if group["initial_lr"] != lr:
                changed.add(f"model.optimizer.lr {group['initial_lr']:g} -> {lr:g}")
                group["initial_lr"] = sched.base_lrs[i] = lr
                group["lr"] = lr * sched.lr_lambdas[i](sched.last_epoch)
            if group["weight_decay"] != wd:
                changed.add(f"weight decay {group['weight_decay']:g} -> {wd:g}")
                group["weight_decay"] = wd
        if changed and self.trainer.is_global_zero:
            print(
                f"resumed with this run's optimiser settings: {', '.join(sorted(changed))} (the checkpoint's differ)"
            )

    # -- checkpoints: trainable weights only ------------------------------------------------------
    def _frozen_key_prefixes(self) -> tuple[str, ...]:
        return tuple(f"net.{p}" for p in self.net.frozen_prefixes())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prefixes = self._frozen_key_prefixes()
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)
        }
        # RNG states (point sampling in the matcher / criterion draws from them), so a resumed run
        # continues exactly; all plain tensors / tuples, loadable with weights_only=True.
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        prefixes = self._frozen_key_prefixes()
        own = {k for k in self.state_dict() if not k.startswith(prefixes)}
        missing = sorted(own - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trained weights of this model (e.g. {missing[:3]}); "
                "it was written by a different model configuration"
            )
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(rng["python"])
