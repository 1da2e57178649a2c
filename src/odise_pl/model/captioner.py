"""Captioners: what the diffusion UNet is conditioned on (Sec. 3.3, Table 4).

One interface, swappable by config (``captioner=implicit | empty | text | heuristic | file``)::

    captioner(images: (B, 3, H, W) in [0, 1], captions: list[str] | None)
        -> cond: (B, L, C), time_offset: (B, T, C_t) | None  (one row per diffusion step)

All are built by :class:`~odise_pl.model.odise.ODISE` from a Hydra partial with the frozen
``text_encoder`` (SD's), the frozen ``clip``, the UNet's ``time_embed_dim`` and the number of
diffusion steps ``num_timesteps``, so the frozen models exist once however many parts use them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from odise_pl.model.clip import FrozenCLIP
from odise_pl.model.text_encoder import SDTextEncoder


class EmptyCaptioner(nn.Module):
    """Every image gets the embedding of the empty string (Table 4 row a). Nothing is trained."""

    def __init__(self, *, text_encoder: SDTextEncoder, **_):  # clip, time sizes: not needed here
        super().__init__()
        # A buffer, not a parameter: derived from frozen weights, recomputed at start-up, never saved.
        self.register_buffer("empty", text_encoder([""]), persistent=False)

    def forward(self, images: Tensor, captions: list[str] | None = None) -> tuple[Tensor, None]:
        return self.empty.expand(images.shape[0], -1, -1), None


class TextCaptioner(nn.Module):
    """A given caption per image (dataset captions, heuristic ones, BLIP outputs) through SD's text encoder."""

    def __init__(self, *, text_encoder: SDTextEncoder, **_):  # clip, time sizes: not needed here
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, images: Tensor, captions: list[str] | None = None) -> tuple[Tensor, None]:
        if captions is None or len(captions) != images.shape[0]:
            got = "none" if captions is None else len(captions)
            raise ValueError(
                f"the text captioner needs one caption per image ({images.shape[0]} images, {got} captions); "
                "serve captions from the data (`data.train_dataset.captions=true`) or use `captioner=implicit`"
            )
        return self.text_encoder(captions), None


class ImplicitCaptioner(nn.Module):
    """Frozen CLIP image embedding -> trained implicit text embedding (Eq. 3).

    PARITY with the official ``LdmImplicitCaptionerExtractor``: the raw CLIP image embedding ``e``
    (not normalised) is mapped by a linear layer, broadcast over the L token positions plus a
    learned positional embedding, and gated onto the empty-caption embedding:
    ``cond = empty + tanh(alpha) * (W e + pos)``, ``alpha`` (1, L, C) element-wise, initialised at 0
    so training starts from the empty caption. Likewise a learned offset of the UNet's time
    embedding, one row per diffusion step: ``offset = tanh(beta) * (W_t e + pos_t)``, ``pos_t``
    (1, T, C_t), ``beta`` (C_t,) initialised at 0.

    ``images: (B, 3, H, W) in [0, 1]`` -> ``cond: (B, L, C)``, ``time_offset: (B, T, C_t) | None``.

    Args:
        text_encoder: SD's frozen text encoder (for the empty-caption embedding).
        clip: frozen CLIP whose image tower embeds the image.
        time_embed_dim: the UNet's time-embedding width (1280 for SD v1); 0 disables the offset.
        num_timesteps: diffusion steps the UNet runs (one offset row each; official: 1).

    """

    def __init__(
        self,
        *,
        text_encoder: SDTextEncoder,
        clip: FrozenCLIP,
        time_embed_dim: int = 0,
        num_timesteps: int = 1,
    ):
        super().__init__()
        self.clip = clip
        self.register_buffer("empty", text_encoder([""]), persistent=False)
        length, width = self.empty.shape[1:]
        embed = clip.embed_dim
        self.proj = nn.Linear(embed, width)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, length, width), std=0.02))
        self.alpha = nn.Parameter(torch.zeros(1, length, width))
        if time_embed_dim:
            self.time_proj = nn.Linear(embed, time_embed_dim)
            self.time_pos_embed = nn.Parameter(
                nn.init.trunc_normal_(torch.zeros(1, num_timesteps, time_embed_dim), std=0.02)
            )
            self.beta = nn.Parameter(torch.zeros(time_embed_dim))
        else:
            self.time_proj = self.time_pos_embed = self.beta = None

    def embed(self, image_embed: Tensor) -> tuple[Tensor, Tensor | None]:
        """Raw CLIP image embeddings (B, D) -> (cond (B, L, C), time offset (B, T, C_t) | None)."""
        e = image_embed.to(self.proj.weight.dtype)
        cond = self.empty.to(e.dtype) + torch.tanh(self.alpha) * (self.proj(e)[:, None, :] + self.pos_embed)
        if self.time_proj is None:
            return cond, None
        return cond, torch.tanh(self.beta) * (self.time_proj(e)[:, None, :] + self.time_pos_embed)

    def forward(self, images: Tensor, captions: list[str] | None = None) -> tuple[Tensor, Tensor | None]:
        return self.embed(self.clip.encode_image(images))
