"""ODISE: image -> class-agnostic masks + mask embeddings (Fig. 2). Imports no Lightning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from odise_pl.model.clip import FrozenCLIP
from odise_pl.model.diffusion_backbone import DiffusionBackbone
from odise_pl.model.sliding_window import slide
from odise_pl.model.text_cache import TensorLRU
from odise_pl.model.text_encoder import SDTextEncoder


class ODISE(nn.Module):
    """Composes the frozen parts (SD backbone + text encoder, CLIP) with the trained ones.

    ``images: (B, 3, H, W) in [0, 1]`` (H, W multiples of the backbone's size divisibility, 64 for
    SD) -> ``{pred_masks: (B, Q, H/4, W/4), mask_embed: (B, Q, D), aux_outputs: [...]}``;
    :meth:`classify` adds ``pred_logits: (B, Q, K [+ 1])`` for a vocabulary.

    Args:
        backbone, text_encoder, clip: frozen, built by Hydra from ``odise_pl.weights``.
        captioner: partial; completed with ``text_encoder``, ``clip``, ``time_embed_dim``, ``num_timesteps``.
        pyramid: partial; completed with the backbone's ``feature_info``.
        pixel_decoder, transformer_decoder: built.
        classifier: partial; completed with CLIP's width, the mask embedding's width and, for a
            model without the objectness head (label supervision), CLIP's embedding of "" as the
            null embedding's initial value (PARITY).
        backbone_size: the diffusion model's native input (512); images are processed by the
            official sliding window (:mod:`~odise_pl.model.sliding_window`).
        prompt: template for the diffusion side's text (category names, caption nouns). PARITY:
            ``None`` (bare names) for label models, ``"a photo of a {}."`` for caption models.
        clip_prompt: template for CLIP's own classification at test time (official: ``"a photo of a {}."``).
        windows_per_pass: sliding windows run through the backbone together (``None``: all).
        vocab_cache_mb: text embeddings of recent vocabularies kept, in MiB, least recently used
            out first (``None``: all, forever; a server sees a new vocabulary per request).

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
        prompt: str | None = None,
        clip_prompt: str | None = "a photo of a {}.",
        windows_per_pass: int | None = None,
        vocab_cache_mb: float | None = 512,
    ):
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.clip = clip
        self.captioner = captioner(
            text_encoder=text_encoder,
            clip=clip,
            time_embed_dim=backbone.time_embed_dim,
            num_timesteps=len(getattr(backbone, "timesteps", (0,))),
        )
        if getattr(backbone, "added_conditioning", False):  # SDXL: the empty prompt's pooled embedding
            backbone.set_added_text(text_encoder.pooled([""]))
        self.pyramid = pyramid(feature_info=backbone.feature_info())
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        has_objectness = getattr(transformer_decoder, "class_embed", None) is not None
        self.classifier = classifier(
            text_dim=clip.embed_dim,
            embed_dim=transformer_decoder.embed_dim,
            null_init=None if has_objectness else clip.encode_text([""])[0],
        )
        self.backbone_size = backbone_size
        self.size_divisibility = backbone.size_divisibility
        if backbone_size % self.size_divisibility:
            raise ValueError(f"backbone_size must be a multiple of {self.size_divisibility}")
        for name, template in (("prompt", prompt), ("clip_prompt", clip_prompt)):
            if template is not None and "{}" not in template:
                raise ValueError(f"model.net.{name}={template!r} must contain '{{}}' where the name goes")
        self.prompt, self.clip_prompt = prompt, clip_prompt
        # DIVERGES(windows-together): all sliding windows through the backbone in one pass (windows_per_pass=1: one at a time)
        self.windows_per_pass = windows_per_pass
        self._vocab_cache = TensorLRU(None if vocab_cache_mb is None else int(vocab_cache_mb * 2**20))

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
    def _window_pyramid(self, windows: Tensor, window_size: tuple[int, int], captions) -> dict[str, Tensor]:
        """Backbone + pyramid of one batch of windows (already at the backbone's size)."""
        if captions is not None and windows.shape[0] != len(captions):
            captions = list(captions) * (windows.shape[0] // len(captions))  # window-major, like the crops
        cond, offset = self.captioner(windows, captions)
        return self.pyramid(self.backbone(windows, cond, offset), window_size)

    def features(self, images: Tensor, captions: list[str] | None = None) -> dict[str, Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> the feature pyramid s2..s5, by the sliding window."""
        out, _ = slide(
            images,
            self.backbone_size,
            lambda windows, size: self._window_pyramid(windows, size, captions),
            self.pyramid.strides,
            self.windows_per_pass,
        )
        return out

    def forward(self, images: Tensor, captions: list[str] | None = None) -> dict:
        div = self.size_divisibility
        if images.shape[-2] % div or images.shape[-1] % div:
            raise ValueError(
                f"input size {tuple(images.shape[-2:])} must be a multiple of {div}; pad it first"
            )
        mask_features, multi_scale = self.pixel_decoder(self.features(images, captions))
        return self.transformer_decoder(multi_scale, mask_features)

    # -- vocabulary --------------------------------------------------------------------------
    def text_embeddings(
        self,
        vocabulary: list[list[str]],
        side: Literal["diffusion", "clip"] = "diffusion",
        check: Callable[[str], None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Raw CLIP text embeddings (K, S, T) and valid (K, S) of a vocabulary of synonym lists, in
        the ``side``'s prompt (:attr:`prompt` or :attr:`clip_prompt`); cached per vocabulary
        (``vocab_cache_mb``). ``check``: called between encoding chunks (a request's deadline).
        """
        prompt = self.prompt if side == "diffusion" else self.clip_prompt
        key = (tuple(tuple(v) for v in vocabulary), prompt)
        cached = self._vocab_cache.get(key)
        if cached is None:
            # Outside inference mode: a cache filled during validation is reused by training steps.
            with torch.inference_mode(False), torch.no_grad():
                cached = self.clip.embed_vocabulary(vocabulary, prompt, check=check)
            self._vocab_cache.put(key, cached)
        emb, valid = cached
        device = self.classifier.logit_scale.device
        return emb.to(device), valid.to(device)

    def word_embeddings(self, words: list[list[str]]) -> Tensor:
        """B lists of K nouns -> (B, K, D) projected, normalised embeddings (the grounding loss's words).

        PARITY with the official ``WordEmbed``: each noun in the prompt (``"a photo of a {}."``),
        CLIP's raw text embedding, the trained ``text_proj``. Each distinct noun is encoded once:
        K_word nouns are sampled with replacement, so most repeat.
        """
        flat = [w for ws in words for w in ws]
        unique = list(dict.fromkeys(flat))
        raw = self.clip.embed_vocabulary([[w] for w in unique], self.prompt)[0][:, 0]
        index = torch.tensor([unique.index(w) for w in flat], device=raw.device)
        emb = self.classifier.project(raw.to(self.classifier.logit_scale.device))
        return emb[index.to(emb.device)].view(len(words), -1, emb.shape[-1])

    def classify(self, outputs: dict, text_embed: Tensor, valid: Tensor) -> dict:
        """Adds ``pred_logits: (B, Q, K [+ 1])`` to the main and every aux prediction set."""
        for out in [outputs, *outputs.get("aux_outputs", [])]:
            out["pred_logits"] = self.classifier(out["mask_embed"], text_embed, valid)
        return outputs


def to_unit(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1]."""
    return images.float().div(255) if images.dtype == torch.uint8 else images
