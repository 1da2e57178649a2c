"""One forward -> panoptic, semantic and instance predictions for any vocabulary (Sec. 3.6)."""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from odise_pl.inference.open_vocab import class_probabilities, pooled_clip_logits, seen_categories
from odise_pl.inference.postprocess import instance_inference, panoptic_inference, semantic_inference
from odise_pl.model.clip import clip_logits
from odise_pl.model.odise import ODISE, to_unit
from odise_pl.model.precision import DTYPES, dtype_of

__all__ = ["Predictor", "seen_categories"]


class Predictor:
    """Wraps a trained :class:`ODISE` for open-vocabulary inference.

    Args:
        net: the model.
        mode: ``ensemble`` (Eq. 10), ``diffusion`` (the diffusion side only) or ``clip``.
        alpha, beta: CLIP's weight for categories seen in training / novel ones. PARITY: 0.3 / 0.7
            for label models, 0.35 / 0.65 for caption models (set by the experiments).
        train_vocabulary: the categories trained on (decides seen vs novel; the COCO panoptic
            synonym lists for the released models).
        clip_side: ``maskclip`` (PARITY: one class token per mask, attending only to its mask's
            patches) or ``pooling`` (averaging CLIP's final dense tokens inside each mask).
        clip_mask_region: the masks MaskCLIP gets, against the unpadded image. ``padded`` (PARITY):
            the network's mask logits over the whole input padded to 64, as the official code hands
            them over at batch size 1 (so a mask reaches the image's border a few per cent early
            along a padded side); ``image``: only the image's own region (aligned).
        object_mask_threshold, overlap_threshold: panoptic merge (0.0 / 0.8).
        topk: instances kept per image (100).
        precision: ``fp32`` (reference), ``bf16`` or ``fp16``: the network runs under autocast in
            that dtype (post-processing stays fp32). bf16 is what GPUs (and CPUs with AVX512-BF16 /
            AMX) run fastest; ``benchmarks/bench_inference.py`` measures speed and the difference.
    """

    def __init__(
        self,
        net: ODISE,
        *,
        mode: str = "ensemble",
        alpha: float = 0.3,
        beta: float = 0.7,
        train_vocabulary: list[list[str]] | None = None,
        # DIVERGES(mask-pooling) with clip_side=pooling: CLIP's final dense tokens pooled per mask (ablation)
        clip_side: Literal["maskclip", "pooling"] = "maskclip",
        # DIVERGES(maskclip-region) with clip_mask_region=image: the image's own region (official: padded)
        clip_mask_region: Literal["padded", "image"] = "padded",
        object_mask_threshold: float = 0.0,
        overlap_threshold: float = 0.8,
        topk: int = 100,
        precision: str = "fp32",
    ):
        dtype_of(precision, "model.predictor.precision")
        if clip_side not in ("maskclip", "pooling"):
            raise ValueError(f"clip_side must be 'maskclip' or 'pooling', got {clip_side!r}")
        if clip_mask_region not in ("padded", "image"):
            raise ValueError(f"clip_mask_region must be 'padded' or 'image', got {clip_mask_region!r}")
        self.precision = precision
        self.net, self.mode, self.alpha, self.beta = net, mode, alpha, beta
        self.train_vocabulary = train_vocabulary
        self.clip_side, self.clip_mask_region = clip_side, clip_mask_region
        self.object_mask_threshold, self.overlap_threshold, self.topk = (
            object_mask_threshold,
            overlap_threshold,
            topk,
        )

    def _autocast(self, images: Tensor):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(images.device.type, dtype=DTYPES[self.precision])

    def _clip_logits(self, image: Tensor, region: Tensor, masks: Tensor, vocabulary) -> Tensor:
        """CLIP's opinion on one image's masks: (1, Q, K).

        ``image`` (1, 3, h, w) unpadded; ``region`` (1, Q, h', w') the network's mask logits over
        the image padded to the size divisibility; ``masks`` (1, Q, h, w) the logits upsampled and
        cropped to the image.
        """
        text, valid = self.net.text_embeddings(vocabulary, side="clip")
        with self._autocast(image):
            if self.clip_side == "pooling":
                return pooled_clip_logits(
                    self.net.clip.dense_features(image).float(), masks, text, valid, self.net.clip.logit_scale
                )
            embed = self.net.clip.mask_embeddings(
                image, region if self.clip_mask_region == "padded" else masks
            )
        return clip_logits(embed.float(), text, valid, self.net.clip.logit_scale.float())

    @torch.no_grad()
    def __call__(
        self,
        images: Tensor,
        meta: list[dict],
        vocabulary: list[list[str]],
        isthing: list[bool],
        captions: list[str] | None = None,
        tasks: tuple[str, ...] = ("panoptic", "semantic", "instance"),
    ) -> list[dict]:
        """Images (B, 3, H, W) (uint8 or [0, 1]) padded; meta per image: ``input_size`` (h, w) of the
        unpadded input and the original ``height``, ``width`` -> per image a dict with ``panoptic``
        ((H, W) ids, segments_info), ``semantic`` ((K, H, W) scores), ``instances``, all at the
        original size, and ``probs`` ((Q, K + 1) class probabilities, last: no object).
        """
        images = to_unit(images)
        with self._autocast(images):
            outputs = self.net(images, captions)
        outputs = {k: v.float() if isinstance(v, Tensor) else v for k, v in outputs.items()}
        text_embed, valid = self.net.text_embeddings(vocabulary)
        diff_logits = self.net.classifier(outputs["mask_embed"], text_embed, valid)
        seen = seen_categories(vocabulary, self.train_vocabulary)
        objectness = outputs.get("pred_objectness")  # caption models' no-object head
        # PARITY (sem_seg_postprocess): bilinear to the padded input, crop, bilinear to the original size
        masks = F.interpolate(
            outputs["pred_masks"], size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        results = []
        for i, m in enumerate(meta):
            h, w = m["input_size"]
            mi = masks[i : i + 1, :, :h, :w]
            clip = None
            # DIVERGES(one-side-modes) with mode=diffusion / clip: one side of Eq. 10 only (ablation)
            if self.mode != "diffusion":
                # DIVERGES(eval-batches): batches of several images; MaskCLIP gets the region a batch of one would have
                # what a batch of this image alone would have been padded to, at the masks' resolution
                div, pred = self.net.size_divisibility, outputs["pred_masks"]
                hp = math.ceil(h / div) * div * pred.shape[-2] // images.shape[-2]
                wp = math.ceil(w / div) * div * pred.shape[-1] // images.shape[-1]
                region = pred[i : i + 1, :, :hp, :wp]
                clip = self._clip_logits(images[i : i + 1, :, :h, :w], region, mi, vocabulary)
            probs = class_probabilities(
                diff_logits[i : i + 1],
                clip,
                seen,
                mode=self.mode,
                alpha=self.alpha,
                beta=self.beta,
                objectness_logits=None if objectness is None else objectness[i : i + 1],
            )[0]
            if (h, w) == (m["height"], m["width"]):
                full = mi[0]  # already at the original size (resizing to the same size is a copy)
            else:
                full = F.interpolate(
                    mi, size=(m["height"], m["width"]), mode="bilinear", align_corners=False
                )[0]
            out: dict = {"probs": probs}
            if "panoptic" in tasks:
                out["panoptic"] = panoptic_inference(
                    probs, full, isthing, self.object_mask_threshold, self.overlap_threshold
                )
            if "semantic" in tasks:
                out["semantic"] = semantic_inference(probs, full)
            if "instance" in tasks:
                out["instances"] = instance_inference(probs, full, isthing, self.topk)
            results.append(out)
        return results
