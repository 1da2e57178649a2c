"""Captioners: what the diffusion UNet is conditioned on (Sec. 3.3, Table 4).

One interface, swappable by config (``model/captioner: implicit | empty | text``)::

    captioner(images: (B, 3, H, W) in [0, 1], captions: list[str] | None)
        -> cond: (B, L, C), time_offset: (B, T) | None

All are built by :class:`~odise_pl.model.odise.ODISE` from a Hydra partial with the frozen
``text_encoder`` (SD's), the frozen ``clip`` and the UNet's ``time_embed_dim``, so the frozen
models exist once however many parts use them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from odise_pl.model.clip import FrozenCLIP
from odise_pl.model.text_encoder import SDTextEncoder


class EmptyCaptioner(nn.Module):
    """Every image gets the embedding of the empty string (Table 4 row a). Nothing is trained."""

    def __init__(
        self, *, text_encoder: SDTextEncoder, clip: FrozenCLIP | None = None, time_embed_dim: int = 0
    ):
        super().__init__()
        # A buffer, not a parameter: derived from frozen weights, recomputed at start-up, never saved.
        self.register_buffer("empty", text_encoder([""]), persistent=False)

    def forward(self, images: Tensor, captions: list[str] | None = None) -> tuple[Tensor, None]:
        return self.empty.expand(images.shape[0], -1, -1), None


class TextCaptioner(nn.Module):
    """A given caption per image (dataset captions, heuristic ones, BLIP outputs) through SD's text encoder."""

    def __init__(
        self, *, text_encoder: SDTextEncoder, clip: FrozenCLIP | None = None, time_embed_dim: int = 0
    ):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, images: Tensor, captions: list[str] | None = None) -> tuple[Tensor, None]:
        if captions is None or len(captions) != images.shape[0]:
            got = "none" if captions is None else len(captions)
            raise ValueError(
                f"the text captioner needs one caption per image ({images.shape[0]} images, {got} captions); "
                "serve captions from the data (`data.captions=true`) or use `model/captioner=implicit`"
            )
        return self.text_encoder(captions), None


class ImplicitCaptioner(nn.Module):
    """Frozen CLIP image embedding -> trained implicit text embedding (Eq. 3).

    PARITY with the official code: ``cond = empty + tanh(alpha) * (W e + pos)``, a linear map of
    the CLIP image embedding ``e`` broadcast over the L token positions plus a learned positional
    embedding, gated on the empty-caption embedding with ``alpha`` ((1, L, D), element-wise)
    initialised at 0 so training starts from the empty caption; and ``time_offset = tanh(beta) * W_t e``
    added to the UNet's time embedding, ``beta`` ((time_embed_dim,)) initialised at 0. (The official
    time projection also adds a learned per-timestep vector; with one timestep that is a constant,
    which is our ``time_proj`` bias: ``scripts/convert_odise_checkpoint.py`` folds it in.)

    Args:
        text_encoder: SD's frozen text encoder (for the empty-caption embedding).
        clip: frozen CLIP whose image tower embeds the image.
        time_embed_dim: the UNet's time-embedding width (1280 for SD v1); 0 disables the offset.

    """

    def __init__(self, *, text_encoder: SDTextEncoder, clip: FrozenCLIP, time_embed_dim: int = 0):
        super().__init__()
        self.clip = clip
        self.register_buffer("empty", text_encoder([""]), persistent=False)
        length, width = self.empty.shape[1:]
        embed = clip.embed_dim
        self.proj = nn.Linear(embed, width)
        self.pos_embed = nn.Parameter(torch.randn(length, width) * 0.02)
        # Element-wise gates, as in the official code (alpha: one per token and channel, beta: one
        # per time-embedding channel), so its checkpoints convert one to one.
        self.alpha = nn.Parameter(torch.zeros(1, length, width))
        self.time_proj = nn.Linear(embed, time_embed_dim) if time_embed_dim else None
        self.beta = nn.Parameter(torch.zeros(time_embed_dim)) if time_embed_dim else None

    def forward(self, images: Tensor, captions: list[str] | None = None) -> tuple[Tensor, Tensor | None]:
        e = self.clip.encode_image(images)  # (B, D), frozen
        cond = self.empty + torch.tanh(self.alpha) * (self.proj(e)[:, None, :] + self.pos_embed)
        offset = torch.tanh(self.beta) * self.time_proj(e) if self.time_proj is not None else None
        return cond, offset
