"""The diffusion model's text encoder: captions -> the token embeddings the UNet cross-attends to
(SD v1: CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H; SDXL: both of its towers, concatenated).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

EOT = 49407  # CLIP BPE end-of-text id; SD v1's tokenizer also pads with it


# DIVERGES(sd-tokenizer): open_clip's copy of CLIP's BPE (same vocabulary and merges), no tokenizer files to fetch
class SDTextEncoder(nn.Module):
    """One frozen CLIP text tower as the diffusion model uses it.

    Args:
        model: transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``
            (``odise_pl.weights.load_text_encoder``).
        pad_token: ``eot`` (SD v1, SDXL's first tower: padding with end-of-text) or ``zero``
            (SD 2.x, SDXL's second tower: OpenCLIP's tokenizer pads with "!", id 0).
        hidden_layer: ``last`` (the last hidden state after the final LayerNorm: SD v1, SD 2.x,
            whose converted tower already lacks OpenCLIP's last layer) or ``penultimate`` (the
            second-to-last layer's output, no final LayerNorm: SDXL).
        second: SDXL's second tower (OpenCLIP bigG), an :class:`SDTextEncoder` itself: its tokens
            are concatenated to this one's along channels (768 + 1280 = 2048) and its pooled
            embedding is :meth:`pooled`.

    Tokenisation uses the CLIP BPE shipped inside open_clip rather than the checkpoint's
    ``tokenizer/`` folder: it is the same vocabulary and merges, and needs no extra files. The UNet
    sees every one of the 77 positions, so padding is rewritten to the model's own.

    """

    def __init__(
        self,
        *,
        model: nn.Module,
        pad_token: str = "eot",
        hidden_layer: str = "last",
        second: SDTextEncoder | None = None,
    ):
        super().__init__()
        import open_clip

        if pad_token not in ("eot", "zero") or hidden_layer not in ("last", "penultimate"):
            raise ValueError(
                f"pad_token must be eot | zero and hidden_layer last | penultimate, got {pad_token!r}, {hidden_layer!r}"
            )
        self.model = model
        self.model.eval().requires_grad_(False)
        self.pad_token, self.hidden_layer = pad_token, hidden_layer
        self.second = second
        self.context_length = int(model.config.max_position_embeddings)
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        own = int(self.model.config.hidden_size)
        return own + (self.second.hidden_size if self.second is not None else 0)

    @property
    def pooled_size(self) -> int:
        """Width of :meth:`pooled` (0 without a tower with a projection)."""
        if self.second is not None:
            return self.second.pooled_size
        return int(self.model.config.projection_dim) if hasattr(self.model, "text_projection") else 0

    def tokenize(self, texts: list[str]) -> Tensor:
        """Texts -> (N, L) token ids, padded as the diffusion model's tokenizer does."""
        tokens = self._tokenizer(list(texts))  # open_clip pads with 0
        if self.pad_token == "zero":
            return tokens
        after_eot = (tokens == EOT).int().cumsum(dim=1) > 0
        first_eot = after_eot & ((tokens == EOT).int().cumsum(dim=1) == 1) & (tokens == EOT)
        return torch.where(after_eot & ~first_eot, torch.full_like(tokens, EOT), tokens)

    def _run(self, texts: list[str]):
        device = next(self.model.parameters()).device
        ids = self.tokenize(texts).to(device)
        return self.model(input_ids=ids, output_hidden_states=self.hidden_layer == "penultimate")

    @torch.no_grad()
    def forward(self, texts: list[str]) -> Tensor:
        """texts: N strings -> (N, L=77, C) conditioning embeddings."""
        out = self._run(texts)
        tokens = out.hidden_states[-2] if self.hidden_layer == "penultimate" else out.last_hidden_state
        if self.second is None:
            return tokens
        return torch.cat([tokens, self.second(texts)], dim=-1)

    @torch.no_grad()
    def pooled(self, texts: list[str]) -> Tensor:
        """texts: N strings -> (N, P) the projected pooled embedding (of the second tower if any)."""
        if self.second is not None:
            return self.second.pooled(texts)
        if not self.pooled_size:
            raise ValueError("this text tower has no projection: no pooled embedding")
        return self._run(texts).text_embeds
