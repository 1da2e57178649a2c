"""The training losses of either supervision, composed: what the LightningModule asks for one batch."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from odise_pl.errors import ConfigError
from odise_pl.loss.criterion import SetCriterion
from odise_pl.loss.grounding import GroundingLoss
from odise_pl.loss.normalisers import Normalisers


def needs_captions() -> ConfigError:
    """What caption supervision without captions in the batch is told."""
    return ConfigError(
        "model.supervision=caption needs captions: set data.k_words > 0 and "
        "data.train_dataset.captions=true (or a caption_source), or train with model.supervision=label"
    )


class ODISELoss(nn.Module):
    """``outputs`` (the model's, with ``pred_logits`` for label supervision), ``targets``, and for
    caption supervision ``words: (B, K, D)`` and the temperature -> named loss terms
    (``loss_ce``, ``loss_mask``, ``loss_dice``[, ``loss_ground``], ``..._{i}`` for aux set i).

    Label supervision (Eq. 5): the category cross-entropy and the mask losses of :class:`SetCriterion`.
    Caption supervision (Eq. 8): the grounding loss on every prediction set, and the mask losses
    with the official caption models' binary objectness head as a 1-class problem (every target
    "object", class 0; unmatched queries "no object"; the same class cost, weights and no-object
    weight as the category loss).

    Args:
        criterion: matching and mask / class losses.
        grounding: the caption grounding loss.
        supervision: ``label`` or ``caption``.
        objectness: whether the model has the binary objectness head (caption models).
    """

    def __init__(
        self,
        *,
        criterion: SetCriterion,
        grounding: GroundingLoss,
        supervision: Literal["label", "caption"],
        objectness: bool,
    ):
        super().__init__()
        if supervision not in ("label", "caption"):
            raise ConfigError(f"model.supervision must be 'label' or 'caption', got {supervision!r}")
        if supervision == "label" and objectness:
            raise ConfigError(
                "model.net.transformer_decoder.objectness=true is the caption models' binary head; "
                "label supervision scores no-object with the null embedding: set it to false"
            )
        if supervision == "caption" and not objectness:
            warnings.warn(
                "caption supervision without the objectness head: nothing trains the no-object score (the "
                "null embedding), so inference keeps spurious segments. Set "
                "model.net.transformer_decoder.objectness=true (as the caption_* experiments do).",
                stacklevel=2,
            )
        self.criterion, self.grounding, self.supervision = criterion, grounding, supervision
        self.objectness = objectness

    def normalisers(self, target_groups: list[list[dict]], num_queries: int, device) -> Normalisers:
        """The step's normalisers from the targets of this process's micro-batches."""
        return self.criterion.normalisers(target_groups, num_queries, device)

    def grounding_terms(
        self, mask_embeds: list[Tensor], words: Tensor, scale: Tensor, words_valid: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``loss_ground`` (final set) and ``loss_ground_{i}`` (aux set i) from each set's
        ``mask_embed`` (B, N, D) and the captions' ``words`` (B, K, D).
        """
        return {
            "loss_ground" + ("" if i == 0 else f"_{i - 1}"): self.grounding(e, words, scale, words_valid)
            for i, e in enumerate(mask_embeds)
        }

    def forward(
        self,
        outputs: dict,
        targets: list[dict],
        words: Tensor | None = None,
        scale: Tensor | None = None,
        words_valid: Tensor | None = None,
        normalisers: Normalisers | None = None,
        ground: bool = True,
    ) -> dict[str, Tensor]:
        """``normalisers``: the step's (default: this batch's, over every process); ``ground=False``
        leaves the grounding terms to the caller (the gradient cache computes them over a whole step).
        """
        sets = [outputs, *outputs.get("aux_outputs", [])]
        if self.supervision == "caption" and self.objectness:
            for out in sets:
                out["pred_logits"] = out["pred_objectness"]
            targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        losses = self.criterion(outputs, targets, normalisers)
        if self.supervision == "caption" and ground:
            if words is None or scale is None:
                raise needs_captions()
            losses.update(
                self.grounding_terms([out["mask_embed"] for out in sets], words, scale, words_valid)
            )
        return losses
