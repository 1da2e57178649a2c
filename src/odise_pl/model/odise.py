"""ODISE: image -> class-agnostic masks + mask embeddings (Fig. 2). Imports no Lightning."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from odise_pl.model.clip import FrozenCLIP
from odise_pl.model.diffusion_backbone import DiffusionBackbone
from odise_pl.model.text_encoder import SDTextEncoder


class ODISE(nn.Module):
    """Composes the frozen parts (SD backbone + text encoder, CLIP) with the trained ones.

    ``images: (B, 3, H, W) in [0, 1]`` (H, W multiples of the backbone's size divisibility, 64 for
    SD) -> ``{pred_masks: (B, Q, H/4, W/4), mask_embed: (B, Q, D), aux_outputs: [...]}``;
    :meth:`classify` adds ``pred_logits: (B, Q, K + 1)`` for a vocabulary.

    Args:
        backbone, text_encoder, clip: frozen, built by Hydra from ``odise_pl.weights``.
        captioner: partial; completed with ``text_encoder``, ``clip``, ``time_embed_dim``.
        pyramid: partial; completed with the backbone's ``feature_info``.
        pixel_decoder, transformer_decoder: built.
        classifier: partial; completed with CLIP's ``embed_dim``.
        backbone_size: the diffusion model's native input (512); larger inputs are processed by a
            sliding window of this size (PARITY with the official slide inference / training).
        slide_stride: window step (multiple of 64); default = ``backbone_size`` (no overlap when
            the size divides; the last window is aligned to the border and overlaps are averaged).
        prompt_templates: prompts for category names ("a photo of a {}.").

    """

    def __init__(
        self,
        *,
        backbone: DiffusionBackbone,
        text_encoder: SDTextEncoder,
        clip: FrozenCLIP,
        captioner: Callable[..., nn.Module],
        pyramid: Callable[..., nn.Module],
        pixel_decoder: nn.Module,
        transformer_decoder: nn.Module,
        classifier: Callable[..., nn.Module],
        backbone_size: int = 512,
        slide_stride: int | None = None,
        prompt_templates: tuple[str, ...] | list[str] = ("a photo of a {}.",),
    ):
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.clip = clip
        self.captioner = captioner(
            text_encoder=text_encoder, clip=clip, time_embed_dim=backbone.time_embed_dim
        )
        self.pyramid = pyramid(feature_info=backbone.feature_info())
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.classifier = classifier(embed_dim=clip.embed_dim)
        head = getattr(transformer_decoder, "embed_head", None)
        out_dim = head[-1].layers[-1].out_features if head is not None else clip.embed_dim
        if out_dim != clip.embed_dim:
            raise ValueError(
                f"the mask-embedding head outputs {out_dim} dims but CLIP's embedding has {clip.embed_dim}; "
                f"set model.net.transformer_decoder.embed_dim={clip.embed_dim}"
            )
        self.backbone_size = backbone_size
        self.slide_stride = slide_stride or backbone_size
        self.size_divisibility = backbone.size_divisibility
        if backbone_size % self.size_divisibility or self.slide_stride % self.size_divisibility:
            raise ValueError(f"backbone_size and slide_stride must be multiples of {self.size_divisibility}")
        self.prompt_templates = tuple(prompt_templates)
        self._vocab_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    # -- frozen / trainable split ----------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone, self.text_encoder, self.clip]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only what is trained: frozen weights never go into a checkpoint."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes())}

    def frozen_prefixes(self) -> tuple[str, ...]:
        prefixes = ["backbone.", "text_encoder.", "clip."]
        prefixes += [
            f"captioner.{n}." for n, m in self.captioner.named_children() if m in self.frozen_modules()
        ]
        return tuple(prefixes)

    # -- features ----------------------------------------------------------------------------
    def _window_starts(self, length: int) -> list[int]:
        if length <= self.backbone_size:
            return [0]
        starts = list(range(0, length - self.backbone_size + 1, self.slide_stride))
        if starts[-1] != length - self.backbone_size:
            starts.append(length - self.backbone_size)
        return starts

    def extract_features(self, images: Tensor, captions: list[str] | None = None) -> dict[str, Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> backbone features averaged over sliding windows."""
        h, w = images.shape[-2:]
        ys, xs = self._window_starts(h), self._window_starts(w)
        if len(ys) == 1 and len(xs) == 1:
            cond, offset = self.captioner(images, captions)
            return self.backbone(images, cond, offset)
        sums: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}
        win_h, win_w = min(h, self.backbone_size), min(w, self.backbone_size)
        for y in ys:
            for x in xs:
                crop = images[..., y : y + win_h, x : x + win_w]
                cond, offset = self.captioner(crop, captions)
                for name, f in self.backbone(crop, cond, offset).items():
                    stride = win_h // f.shape[-2]
                    if name not in sums:
                        sums[name] = f.new_zeros(*f.shape[:2], math.ceil(h / stride), math.ceil(w / stride))
                        counts[name] = f.new_zeros(1, 1, *sums[name].shape[-2:])
                    fy, fx = y // stride, x // stride
                    sums[name][..., fy : fy + f.shape[-2], fx : fx + f.shape[-1]] += f
                    counts[name][..., fy : fy + f.shape[-2], fx : fx + f.shape[-1]] += 1
        return {name: sums[name] / counts[name].clamp(min=1) for name in sums}

    def forward(self, images: Tensor, captions: list[str] | None = None) -> dict:
        div = self.size_divisibility
        if images.shape[-2] % div or images.shape[-1] % div:
            raise ValueError(
                f"input size {tuple(images.shape[-2:])} must be a multiple of {div}; pad it first"
            )
        feats = self.extract_features(images, captions)
        pyramid = self.pyramid(feats, tuple(images.shape[-2:]))
        mask_features, multi_scale = self.pixel_decoder(pyramid)
        return self.transformer_decoder(multi_scale, mask_features)

    # -- vocabulary --------------------------------------------------------------------------
    def text_embeddings(self, vocabulary: list[list[str]]) -> tuple[Tensor, Tensor]:
        """(K, S, D), (K, S) for a vocabulary of synonym lists; cached per vocabulary."""
        key = (tuple(tuple(v) for v in vocabulary), self.prompt_templates)
        if key not in self._vocab_cache:
            # Outside inference mode: a cache filled during validation is reused by training steps.
            with torch.inference_mode(False), torch.no_grad():
                self._vocab_cache[key] = self.clip.embed_vocabulary(vocabulary, self.prompt_templates)
        emb, valid = self._vocab_cache[key]
        device = self.classifier.logit_scale.device
        return emb.to(device), valid.to(device)

    def word_embeddings(self, words: list[list[str]]) -> Tensor:
        """B lists of K nouns -> (B, K, D) prompted, normalised CLIP text embeddings (not cached).

        Each distinct noun is encoded once: K_word nouns are sampled with replacement, so most repeat.
        """
        flat = [w for ws in words for w in ws]
        unique = list(dict.fromkeys(flat))
        emb = self.clip.embed_vocabulary([[w] for w in unique], self.prompt_templates)[0][:, 0]
        index = torch.tensor([unique.index(w) for w in flat], device=emb.device)
        return emb[index].view(len(words), -1, emb.shape[-1])

    def classify(self, outputs: dict, text_embed: Tensor, valid: Tensor) -> dict:
        """Adds ``pred_logits: (B, Q, K + 1)`` to the main and every aux prediction set."""
        for out in [outputs, *outputs.get("aux_outputs", [])]:
            out["pred_logits"] = self.classifier(out["mask_embed"], text_embed, valid)
        return outputs


def to_unit(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1]."""
    return images.float().div(255) if images.dtype == torch.uint8 else images
