"""Stable Diffusion v1's text encoder: captions -> the token embeddings the UNet cross-attends to."""

from __future__ import annotations

import torch
from torch import Tensor, nn

EOT = 49407  # CLIP BPE end-of-text id; SD v1's tokenizer also pads with it


# DIVERGES(sd-tokenizer): open_clip's copy of CLIP's BPE (same vocabulary and merges), no tokenizer files to fetch
class SDTextEncoder(nn.Module):
    """Frozen CLIP text tower as SD v1 uses it (last hidden state after the final LayerNorm).

    Args:
        model: transformers ``CLIPTextModel`` (``odise_pl.weights.load_text_encoder``).

    Tokenisation uses the CLIP BPE shipped inside open_clip rather than the checkpoint's
    ``tokenizer/`` folder: it is the same vocabulary and merges, and needs no extra files. SD v1's
    tokenizer pads with end-of-text rather than 0, and the UNet sees every one of the 77 positions,
    so padding is rewritten to match.

    """

    def __init__(self, *, model: nn.Module):
        super().__init__()
        import open_clip

        self.model = model
        self.model.eval().requires_grad_(False)
        self.context_length = int(model.config.max_position_embeddings)
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> Tensor:
        """Texts -> (N, L) token ids, padded with end-of-text as SD v1's tokenizer does."""
        tokens = self._tokenizer(list(texts))
        after_eot = (tokens == EOT).int().cumsum(dim=1) > 0
        first_eot = after_eot & ((tokens == EOT).int().cumsum(dim=1) == 1) & (tokens == EOT)
        return torch.where(after_eot & ~first_eot, torch.full_like(tokens, EOT), tokens)

    @torch.no_grad()
    def forward(self, texts: list[str]) -> Tensor:
        """texts: N strings -> (N, L=77, C) conditioning embeddings."""
        device = next(self.model.parameters()).device
        ids = self.tokenize(texts).to(device)
        return self.model(input_ids=ids).last_hidden_state
