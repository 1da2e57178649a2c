"""One forward -> panoptic, semantic and instance predictions for any vocabulary (Sec. 3.6)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from odise_pl.inference.open_vocab import class_probabilities
from odise_pl.inference.postprocess import instance_inference, panoptic_inference, semantic_inference
from odise_pl.model.odise import ODISE, to_unit

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seen_categories(vocabulary: list[list[str]], train_vocabulary: list[list[str]] | None) -> Tensor:
    """(K,) bool: a category is seen in training when any of its names is a training category's name."""
    if not train_vocabulary:
        return torch.zeros(len(vocabulary), dtype=torch.bool)
    train = {n.lower() for syns in train_vocabulary for n in syns}
    return torch.tensor([any(n.lower() in train for n in syns) for syns in vocabulary], dtype=torch.bool)


class Predictor:
    """Wraps a trained :class:`ODISE` for open-vocabulary inference.

    Args:
        net: the model.
        mode: ``ensemble`` (Eq. 10), ``diffusion`` (Eq. 6 only) or ``clip``.
        alpha, beta: CLIP weight for categories seen in training / novel ones (0.35 / 0.65).
        train_vocabulary: the categories trained on (decides seen vs novel).
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
        alpha: float = 0.35,
        beta: float = 0.65,
        train_vocabulary: list[list[str]] | None = None,
        object_mask_threshold: float = 0.0,
        overlap_threshold: float = 0.8,
        topk: int = 100,
        precision: str = "fp32",
    ):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        self.precision = precision
        self.net, self.mode, self.alpha, self.beta = net, mode, alpha, beta
        self.train_vocabulary = train_vocabulary
        self.object_mask_threshold, self.overlap_threshold, self.topk = (
            object_mask_threshold,
            overlap_threshold,
            topk,
        )

    def _autocast(self, images: Tensor):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(images.device.type, dtype=DTYPES[self.precision])

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
        ((H, W) ids, segments_info), ``semantic`` ((K, H, W) scores), ``instances``, all at the original size.
        """
        images = to_unit(images)
        with self._autocast(images):
            outputs = self.net(images, captions)
        outputs = {k: v.float() if isinstance(v, Tensor) else v for k, v in outputs.items()}
        text_embed, valid = self.net.text_embeddings(vocabulary)
        diff_logits = self.net.classifier(outputs["mask_embed"], text_embed, valid)
        seen = seen_categories(vocabulary, self.train_vocabulary)
        objectness = outputs.get("pred_objectness")  # caption models' no-object head
        masks = F.interpolate(
            outputs["pred_masks"], size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        results = []
        for i, m in enumerate(meta):
            h, w = m["input_size"]
            mi = masks[i : i + 1, :, :h, :w]
            dense = None
            if self.mode != "diffusion":
                with self._autocast(images):
                    dense = self.net.clip.dense_features(images[i : i + 1, :, :h, :w]).float()
            probs = class_probabilities(
                diff_logits[i : i + 1],
                mi,
                dense,
                text_embed,
                valid,
                seen,
                self.net.clip.logit_scale,
                self.mode,
                self.alpha,
                self.beta,
                None if objectness is None else objectness[i : i + 1],
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
