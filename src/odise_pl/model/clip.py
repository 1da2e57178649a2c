"""Frozen CLIP (open_clip): image embeddings for the implicit captioner, text embeddings of
category names / nouns for mask classification, and dense image features for the CLIP opinion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class FrozenCLIP(nn.Module):
    """Wraps an open_clip ``CLIP``; never trained, never checkpointed.

    Args:
        model: an open_clip model (``odise_pl.weights.load_open_clip``).
        tokenizer: open_clip tokenizer name (``open_clip.get_tokenizer``); ``None`` is CLIP's BPE,
            which ships inside open_clip, so tokenising never needs the network.

    """

    def __init__(self, *, model: nn.Module, tokenizer: str | None = None, mean=OPENAI_MEAN, std=OPENAI_STD):
        super().__init__()
        import open_clip

        self.model = model
        self.model.eval().requires_grad_(False)
        self.tokenizer = (
            open_clip.get_tokenizer(tokenizer) if tokenizer else open_clip.tokenizer.SimpleTokenizer()
        )
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._shared: tuple[Tensor, Tensor] | None = None  # (preprocessed input, its dense tokens)
        self.share_tokens = True  # off: every call runs its own pass (the benchmarks' eager baseline)
        self.eval()

    def train(self, mode: bool = True):  # frozen: stays in eval mode whatever the parent does
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1]) if self.model.text_projection is not None else 0

    def preprocess(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised at CLIP's input size.

        Resized as a whole (no centre crop): a crop could cut off the objects the caption should name.
        """
        x = F.interpolate(
            images.float(), size=self.image_size, mode="bicubic", align_corners=False, antialias=True
        )
        return (x.clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, D) L2-normalised image embeddings.

        With a ViT tower the same pass keeps the dense tokens: when :meth:`dense_features` is then
        asked for the same preprocessed input (the CLIP opinion at test time on an unpadded image),
        it reuses them instead of running the tower again. The check is on the input's values, so a
        different input can never get stale features.
        """
        x = self.preprocess(images)
        if self.share_tokens and self._has_dense_tokens():
            pooled, tokens = self._visual_tokens(x)
            self._shared = (x, tokens)
            return F.normalize(pooled, dim=-1)
        return F.normalize(self.model.encode_image(x), dim=-1)

    def _has_dense_tokens(self) -> bool:
        visual = self.model.visual
        return hasattr(visual, "output_tokens") and getattr(visual, "proj", None) is not None

    def _visual_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pooled projected embedding (B, D), patch tokens before projection (B, N, W)) in one pass."""
        visual = self.model.visual
        before = visual.output_tokens
        visual.output_tokens = True
        try:
            return visual(x)
        finally:
            visual.output_tokens = before

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """texts: N strings -> (N, D) L2-normalised text embeddings."""
        if len(texts) == 0:
            raise ValueError("encode_text got an empty list of texts")
        tokens = self.tokenizer(list(texts)).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    @torch.no_grad()
    def embed_vocabulary(
        self, vocabulary: list[list[str]], templates: tuple[str, ...] = ("a photo of a {}.",)
    ) -> tuple[Tensor, Tensor]:
        """Prompted text embeddings of a vocabulary with synonyms.

        vocabulary: K categories, each a non-empty list of names (synonyms)
        -> embeddings (K, S, D) L2-normalised (mean over templates), valid (K, S) bool, S = most synonyms.
        """
        if not vocabulary or any(len(names) == 0 for names in vocabulary):
            raise ValueError("the vocabulary is empty or has a category without a name")
        flat = [(k, s, n) for k, names in enumerate(vocabulary) for s, n in enumerate(names)]
        texts = [t.format(n) for _, _, n in flat for t in templates]
        emb = self.encode_text(texts).view(len(flat), len(templates), -1).mean(1)
        emb = F.normalize(emb, dim=-1)
        n_syn = max(len(v) for v in vocabulary)
        out = emb.new_zeros(len(vocabulary), n_syn, emb.shape[-1])
        valid = torch.zeros(len(vocabulary), n_syn, dtype=torch.bool, device=emb.device)
        for i, (k, s, _) in enumerate(flat):
            out[k, s] = emb[i]
            valid[k, s] = True
        return out, valid

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's own learned temperature (exp, ~100 for OpenAI weights)."""
        return self.model.logit_scale.exp().clamp(max=100)

    @torch.no_grad()
    def dense_features(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, D, g, g) projected patch tokens of the last block.

        For the CLIP opinion at test time (Eq. 9): the ViT's patch tokens after its final
        LayerNorm, through its projection into the joint space. ViT towers only.
        """
        visual = self.model.visual
        if not self._has_dense_tokens():
            raise NotImplementedError(
                f"dense CLIP features need an open_clip ViT image tower; {type(visual).__name__} has none. "
                "Use a ViT CLIP (e.g. ViT-L-14-336) or turn the CLIP opinion off (model.open_vocab.mode=diffusion)"
            )
        x = self.preprocess(images)
        shared = getattr(self, "_shared", None)
        if shared is not None and shared[0].shape == x.shape and torch.equal(shared[0], x):
            tokens = shared[1]
        else:
            _, tokens = self._visual_tokens(x)
        self._shared = None
        if getattr(visual, "final_ln_after_pool", False):
            tokens = visual.ln_post(tokens)
        tokens = tokens @ visual.proj  # (B, g*g, D)
        b, n, d = tokens.shape
        g = int(round(n**0.5))
        return tokens.transpose(1, 2).reshape(b, d, g, n // g)
