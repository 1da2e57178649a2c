"""Frozen CLIP (open_clip): the image embedding the implicit captioner reads, raw text embeddings
of category names / nouns, and CLIP's second opinion on each predicted mask at test time (Eq. 9).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from odise_pl.model.maskclip import mask_token_embeddings, patch_visibility
from odise_pl.model.precision import dtype_of

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT = 77  # CLIP's text context, in tokens
WORD_CHARS = 200  # longer "words" are cut before BPE (no real word is near it)
TOKENIZER_CACHE_WORDS = 100_000


def clip_text(text: str) -> str:
    """``text`` as CLIP's tokenizer should see it: its first 77 words, each cut at 200 characters.

    Why: CLIP's BPE costs at least the square of a word's length, so one long unbroken "word"
    (40 KB) blocks a process for a minute. Cutting cannot change what CLIP reads from real text: the
    tokenizer gives every word at least one token and keeps the first 77, so words after the 77th
    are dropped anyway, and no word of a real vocabulary comes near 200 characters.
    """
    words = text.split()
    if len(words) <= CONTEXT and all(len(w) <= WORD_CHARS for w in words):
        return text
    return " ".join(w[:WORD_CHARS] for w in words[:CONTEXT])


class FrozenCLIP(nn.Module):
    """Wraps an open_clip ``CLIP``; never trained, never checkpointed.

    Embeddings are returned *raw* (not L2-normalised), as the official ``ClipAdapter(normalize=False)``
    hands them over: the implicit captioner maps the raw image embedding, the classifier's
    ``text_proj`` the raw text embeddings; cosines normalise where they are taken.

    Args:
        model: an open_clip model (``odise_pl.weights.load_open_clip``).
        tokenizer: open_clip tokenizer name (``open_clip.get_tokenizer``); ``None`` is CLIP's BPE,
            which ships inside open_clip, so tokenising never needs the network.
        antialias: antialiased bicubic resizing in :meth:`preprocess`. The official code resizes
            tensors with torchvision's ``Resize``, whose default became antialiasing in torchvision
            0.17; the fixtures in ``shared/parity`` were produced that way (the 2023 runs behind the
            paper used torchvision 0.14, which did not antialias tensors: ``false`` reproduces them).
        dtype: ``None`` (as loaded) | ``fp32`` | ``bf16`` | ``fp16``: the image tower's weights (304M parameters for
            ViT-L/14-336: 1.2 GB in fp32). Its embeddings come out in that dtype; the parts that
            read them cast. The text tower stays fp32: its embeddings are computed once per
            vocabulary and cached.

    """

    def __init__(
        self,
        *,
        model: nn.Module,
        tokenizer: str | None = None,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        # DIVERGES(clip-antialias): antialiased as the official code under torchvision >= 0.17; its 2023 runs did not (antialias=false)
        antialias: bool = True,
        dtype: str | None = None,
    ):
        super().__init__()
        import open_clip

        self.model = model
        self.model.eval().requires_grad_(False)
        if dtype is not None:
            self.set_image_dtype(dtype)
        self.tokenizer = (
            open_clip.get_tokenizer(tokenizer) if tokenizer else open_clip.tokenizer.SimpleTokenizer()
        )
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.antialias = antialias
        # Python floats, made into tensors of the input's dtype when used: a float32 buffer cast to
        # float64 would differ from the constants in the 8th digit.
        self.pixel_mean, self.pixel_std = tuple(mean), tuple(std)
        self.eval()

    def set_image_dtype(self, dtype: str) -> None:
        """Cast the image tower's weights (``fp32`` | ``bf16`` | ``fp16``; see ``dtype`` above)."""
        self.model.visual.to(dtype_of(dtype, "model.net.clip.dtype"))

    def train(self, mode: bool = True):  # frozen: stays in eval mode whatever the parent does
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        """Width of CLIP's joint embedding space (768 for ViT-L/14)."""
        if getattr(self.model, "text_projection", None) is not None:
            proj = self.model.text_projection
            return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1])
        return int(self.model.visual.output_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    # -- image side --------------------------------------------------------------------------------
    def preprocess(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised, S = CLIP's input size.

        PARITY with the official ``ClipAdapter.clip_preprocess`` (open_clip's transform less its
        ToTensor): bicubic resize of the shorter side to S, centre crop S x S, normalise.
        """
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        x = TF.resize(
            images.to(self.dtype), [min(self.image_size)], InterpolationMode.BICUBIC, antialias=self.antialias
        )
        return self._normalize(TF.center_crop(x, list(self.image_size)))

    def _normalize(self, x: Tensor) -> Tensor:
        mean = torch.tensor(self.pixel_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, D) raw image embeddings (``ln_post(cls) @ proj``)."""
        return self.model.encode_image(self.preprocess(images))

    def _squash(self, images: Tensor) -> Tensor:
        """The whole image bilinearly resized to CLIP's input size (aspect not kept), normalised."""
        x = F.interpolate(images.to(self.dtype), size=self.image_size, mode="bilinear", align_corners=False)
        return self._normalize(x)

    @torch.no_grad()
    def mask_embeddings(self, images: Tensor, mask_logits: Tensor, threshold: float = 0.5) -> Tensor:
        """MaskCLIP: images (B, 3, H, W) in [0, 1], mask logits (B, Q, h, w) -> (B, Q, D) raw
        embeddings of each mask's region (PARITY with the official ``MaskCLIP.get_mask_embed``).

        The image and the masks are resized to CLIP's input size as wholes (bilinear); one copy of
        the class token per mask sees only the class token and the patches its mask covers
        (:func:`~odise_pl.model.maskclip.patch_visibility`), in every layer.
        """
        pixels = self._squash(images)
        visible = patch_visibility(mask_logits.to(pixels.dtype), self.image_size, self.patch_size, threshold)
        return mask_token_embeddings(self.model.visual, pixels, visible)

    def mask_visibility(self, mask_logits: Tensor, threshold: float = 0.5) -> Tensor:
        """(B, Q, h, w) mask logits -> (B, Q, g, g) bool: which CLIP patches each mask token sees."""
        g = self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size
        return patch_visibility(mask_logits, self.image_size, self.patch_size, threshold).view(
            *mask_logits.shape[:2], *g
        )

    @property
    def patch_size(self) -> int:
        k = self.model.visual.conv1.kernel_size
        return int(k[0] if isinstance(k, tuple) else k)

    @torch.no_grad()
    def dense_features(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, D, g, g) projected patch tokens of the last block.

        For the pooling alternative to MaskCLIP (``clip_side=pooling``) and the k-means notebook:
        the ViT's patch tokens after its final LayerNorm, through its projection into the joint
        space, for the image resized as a whole like MaskCLIP's. ViT towers only.
        """
        visual = self.model.visual
        if not (hasattr(visual, "output_tokens") and getattr(visual, "proj", None) is not None):
            raise NotImplementedError(
                f"dense CLIP features need an open_clip ViT image tower; {type(visual).__name__} has none. "
                "Use a ViT CLIP (e.g. ViT-L-14-336) or classify with the diffusion side only "
                "(model.predictor.mode=diffusion)"
            )
        before = visual.output_tokens
        visual.output_tokens = True
        try:
            _, tokens = visual(self._squash(images))
        finally:
            visual.output_tokens = before
        if getattr(visual, "final_ln_after_pool", False):
            tokens = visual.ln_post(tokens)
        tokens = tokens @ visual.proj  # (B, g*g, D)
        g = int(round(tokens.shape[1] ** 0.5))
        return rearrange(tokens, "b (gh gw) d -> b d gh gw", gh=g)

    # -- text side ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """texts: N strings -> (N, D) raw text embeddings (the end-of-text token's, projected)."""
        if len(texts) == 0:
            raise ValueError("encode_text got an empty list of texts")
        tokens = self.tokenizer([clip_text(t) for t in texts]).to(self.model.logit_scale.device)
        cache = getattr(self.tokenizer, "cache", None)  # open_clip's BPE cache: one entry per word, forever
        if isinstance(cache, dict) and len(cache) > TOKENIZER_CACHE_WORDS:
            specials = {k: v for k, v in cache.items() if k.startswith("<")}
            cache.clear()
            cache.update(specials)
        return self.model.encode_text(tokens)

    @torch.no_grad()
    def embed_vocabulary(
        self,
        vocabulary: list[list[str]],
        prompt: str | None = None,
        chunk_size: int = 256,
        check: Callable[[str], None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Raw text embeddings of a vocabulary with synonyms.

        vocabulary: K categories, each a non-empty list of names (synonyms); prompt: a template
        like ``"a photo of a {}."`` or ``None`` for the bare names
        -> embeddings (K, S, D), valid (K, S) bool, S = most synonyms. Encoded ``chunk_size``
        names at a time; ``check(stage)`` is called after each chunk (a request's deadline).
        """
        if not vocabulary or any(len(names) == 0 for names in vocabulary):
            raise ValueError("the vocabulary is empty or has a category without a name")
        flat = [(k, s, n) for k, names in enumerate(vocabulary) for s, n in enumerate(names)]
        texts = [prompt.format(n) if prompt else n for _, _, n in flat]
        # In chunks: memory grows with the K embeddings, not with the text tower's activations of all
        # K x S texts at once (20k categories: gigabytes).
        chunks = []
        for i in range(0, len(texts), chunk_size):
            chunks.append(self.encode_text(texts[i : i + chunk_size]))
            if check is not None:
                check(f"encoding the vocabulary ({i + len(chunks[-1])} of {len(texts)} names)")
        emb = torch.cat(chunks)
        n_syn = max(len(v) for v in vocabulary)
        out = emb.new_zeros(len(vocabulary), n_syn, emb.shape[-1])
        valid = torch.zeros(len(vocabulary), n_syn, dtype=torch.bool, device=emb.device)
        k_idx = torch.tensor([k for k, _, _ in flat], device=emb.device)
        s_idx = torch.tensor([s for _, s, _ in flat], device=emb.device)
        out[k_idx, s_idx] = emb
        valid[k_idx, s_idx] = True
        return out, valid

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's own learned temperature (exp, clamped at 100; ~100 for OpenAI weights)."""
        return self.model.logit_scale.exp().clamp(max=100)


def clip_logits(mask_embed: Tensor, text_embed: Tensor, valid: Tensor, scale: Tensor | float) -> Tensor:
    """CLIP's classification of each mask: (B, Q, D), raw text (K, S, D), valid (K, S) -> (B, Q, K).

    PARITY with the official ``MaskCLIP.pred_logits``: ``scale * cos``, max over synonyms.
    """
    z = F.normalize(mask_embed, dim=-1)
    t = F.normalize(text_embed.to(z.dtype), dim=-1)
    sim = torch.einsum("bqd,ksd->bqks", z, t).masked_fill(~valid.to(z.device), float("-inf")).amax(-1)
    return scale * sim


ClipSide = Literal["maskclip", "pooling"]
