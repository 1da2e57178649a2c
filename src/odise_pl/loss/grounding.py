"""Caption grounding loss (Eq. 7-8) over the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from odise_pl.loss.normalisers import at_least_fp32, world_size


def gather_with_local_grad(x: Tensor) -> Tensor:
    """all_gather along dim 0; this rank's slice keeps its autograd graph, the others are constants."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, 0)


def grounding_similarity(
    mask_embed: Tensor, word_embed: Tensor, scale: Tensor, softmax_over: str = "queries"
) -> Tensor:
    """Eq. 7 for every (image m, caption n) pair.

    mask_embed (Bi, N, D), word_embed (Bt, K, D) (both L2-normalised here) -> g (Bi, Bt).
    ``softmax_over``: ``queries`` (official code: each word spreads its weight over the masks, so
    it is grounded by one or a few regions and ungrounded regions go unpenalised, as Sec. 3.5
    describes) or ``words`` (Eq. 7 read literally: each mask's softmax over the K words).
    """
    z = F.normalize(mask_embed, dim=-1)
    w = F.normalize(word_embed, dim=-1)
    sim = torch.einsum("mid,nkd->mnik", z, w)  # (Bi, Bt, N, K)
    dim = {"queries": 2, "words": 3}[softmax_over]
    p = (scale * sim).softmax(dim=dim)
    return (p * sim).sum(2).mean(-1)


class GroundingLoss(nn.Module):
    """Symmetric image-caption contrastive loss on g (Eq. 8), over the batch gathered from all processes.

    PARITY with the official ``MaskGroundingCriterion``: the mean of the two directions,
    ``0.5 * (CE(image -> text) + CE(text -> image))``.

    ``mask_embed: (B, N, D)``, ``word_embed: (B, K, D)`` (K_word nouns sampled from one caption),
    ``scale`` = 1/tau (the classifier's learnable logit scale), ``valid: (B,)`` bool (optional: a
    caption with no noun phrase has only empty words) -> scalar.

    PARITY with the official masking of invalid captions: image -> text is the cross-entropy over
    the images weighted by their own caption's validity (``weight=valid``; unweighted if no caption
    of the batch is valid, as the official fallback); text -> image is each caption's cross-entropy
    times its validity, averaged over all captions. An invalid caption's (empty) words still count
    as negatives of the other images, as officially. (The official code takes these means per
    process before DDP averages them; here they are over the global batch, the same whenever every
    process has as many valid captions.)

    Under DDP every process computes the loss of the whole global batch, with gradients through
    its own samples only; their backward is scaled by the world size so that DDP's gradient
    averaging yields exactly the single-process gradient of the global-batch loss. The temperature
    enters every process's loss whole, so its gradient is left unscaled (DDP averages equal values).
    The value returned is the unscaled loss. Under gradient accumulation the global batch spans
    micro-batches too: :mod:`odise_pl.loss.global_batch` hands this loss all of a step's
    embeddings at once (gradient cache).

    Args:
        weight: loss weight.
        softmax_over: see :func:`grounding_similarity` (default ``queries``, PARITY with the official code;
            departs from the literal Eq. 7, whose softmax runs over words).

    """

    # DIVERGES(grounding-words) with softmax_over=words: Eq. 7 read literally (official: over queries)
    def __init__(self, *, weight: float = 1.0, softmax_over: str = "queries"):
        super().__init__()
        if softmax_over not in ("queries", "words"):
            raise ValueError(f"softmax_over must be 'queries' or 'words', got {softmax_over!r}")
        self.weight, self.softmax_over = weight, softmax_over

    def forward(
        self, mask_embed: Tensor, word_embed: Tensor, scale: Tensor, valid: Tensor | None = None
    ) -> Tensor:
        world = world_size()
        scale = at_least_fp32(scale)
        if world > 1:  # value unchanged; gradient / world, undoing the scaling below for the temperature
            scale = scale / world + scale.detach() * (1 - 1 / world)
        z = gather_with_local_grad(at_least_fp32(mask_embed))
        w = gather_with_local_grad(at_least_fp32(word_embed))
        g = grounding_similarity(z, w, scale, self.softmax_over)
        logits = scale * g
        target = torch.arange(g.shape[0], device=g.device)
        # gathered whenever given: whether any caption is invalid is a global decision (every
        # process must run the same collectives)
        v = (
            None
            if valid is None
            else gather_with_local_grad(valid.to(device=logits.device, dtype=logits.dtype))
        )
        if v is None or bool(v.all()):
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        else:
            image_to_text = (
                F.cross_entropy(logits, target, weight=v) if v.any() else F.cross_entropy(logits, target)
            )
            text_to_image = (F.cross_entropy(logits.t(), target, reduction="none") * v).mean()
            loss = 0.5 * (image_to_text + text_to_image)
        if world > 1:
            loss = loss * world - (loss * (world - 1)).detach()
        return self.weight * loss
