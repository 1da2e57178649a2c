"""One optimiser step's losses over its whole global batch, however the batch is split.

The official recipe trains on 64 images per step, 8 on each of 8 GPUs. With fewer GPUs the same
global batch is reached by gradient accumulation, and two things then depend on the split unless
the whole step is seen at once:

- the caption grounding loss is contrastive: every image against every caption of the global
  batch, not of its micro-batch;
- the mask losses are divided by the global batch's number of target masks.

The normalisers are counted from the targets of every micro-batch before any forward pass
(:mod:`odise_pl.loss.normalisers`). The grounding loss uses the gradient-cache technique (Gao et
al., 2021, "Scaling deep contrastive learning batch size under memory limited setup"): a first
pass without gradients computes every micro-batch's mask embeddings and word embeddings; the loss
over all of them (gathered across processes) is computed once and differentiated with respect to
the embeddings alone; a second pass re-runs each micro-batch with gradients and back-propagates its
own losses plus the embeddings' dot product with their cached gradients. Peak memory stays that of
one micro-batch (the cached embeddings are B x 10 sets x queries x 256 numbers); the price is a
second forward pass of each micro-batch, paid only for caption supervision under accumulation.

Why ours: no library implements gradient caching for a loss over several prediction sets with
deep supervision inside Lightning's automatic optimisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from odise_pl.loss.normalisers import world_size
from odise_pl.loss.odise_loss import ODISELoss, needs_captions

Forward = Callable[[dict], tuple[dict, "Tensor | None"]]


@dataclass
class StepLosses:
    """terms: this process's share of each loss term of the step (detached; DDP's average over
    processes is the global value); last: the last micro-batch's loss, not yet back-propagated (the
    caller's optimiser closure does, so that DDP synchronises the accumulated gradients once).
    """

    terms: dict[str, Tensor]
    last: Tensor


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _prediction_sets(outputs: dict) -> list[dict]:
    return [outputs, *outputs.get("aux_outputs", [])]


def global_batch_step(
    loss: ODISELoss,
    micro_batches: list[dict],
    forward: Forward,
    backward: Callable[[Tensor], None],
    scale: Tensor,
    num_queries: int,
    all_finite: Callable[[dict[str, Tensor]], bool] = lambda terms: all(
        bool(torch.isfinite(v)) for v in terms.values()
    ),
) -> StepLosses | None:
    """Losses of one step over ``micro_batches`` (this process's share of the global batch).

    Args:
        loss: the composed training losses.
        micro_batches: collated batches with ``images``, ``targets`` and, for caption supervision,
            ``words`` [and ``words_valid``].
        forward: ``batch -> (outputs, word embeddings (B, K, D) or None)``: the model's forward pass
            (with ``pred_logits`` for label supervision).
        backward: back-propagates a micro-batch's loss (the strategy's, so mixed-precision scaling
            applies); called for every micro-batch but the last.
        scale: the classifier's learnable logit scale (1 / temperature).
        num_queries: the model's queries (each image's unmatched ones weigh in the cross-entropy).
        all_finite: whether named loss values (detached) are finite on every process (a collective
            under DDP: called the same number of times on each).

    Returns ``None`` when a loss is not finite: the step must be skipped and the gradients that
    earlier micro-batches left discarded.
    """
    if not micro_batches:
        raise ValueError("global_batch_step needs at least one micro-batch")
    images = micro_batches[0]["images"]
    caption = loss.supervision == "caption"
    if caption and any(mb.get("words") is None for mb in micro_batches):
        raise needs_captions()
    norm = loss.normalisers([mb["targets"] for mb in micro_batches], num_queries, images.device)
    cache = None
    if caption and len(micro_batches) > 1:
        cache = _cache_grounding_gradients(loss, micro_batches, forward, scale, all_finite)
        if cache is None:
            return None
    terms: dict[str, Tensor] = dict(cache.terms) if cache is not None else {}
    last = None
    for i, mb in enumerate(micro_batches):
        if cache is not None:
            _set_rng_state(cache.rng[i], images.device)  # the same forward pass as the cached one
        outputs, words = forward(mb)
        step = loss(
            outputs,
            mb["targets"],
            words,
            scale,
            mb.get("words_valid"),
            normalisers=norm,
            ground=cache is None,
        )
        if not all_finite({k: v.detach() for k, v in step.items()}):
            return None
        value = sum(step.values())
        for k, v in step.items():
            terms[k] = terms[k] + v.detach() if k in terms else v.detach()
        if cache is not None:
            value = value + cache.surrogate(
                i, _prediction_sets(outputs), words, scale, last=i == len(micro_batches) - 1
            )
        if i < len(micro_batches) - 1:
            backward(value)
        else:
            last = value
    assert last is not None
    return StepLosses(terms=terms, last=last)


@dataclass
class _GroundingCache:
    terms: dict[str, Tensor]  # the grounding terms' values
    embed_grads: list[list[Tensor]]  # [micro-batch][prediction set] d loss / d mask_embed
    word_grads: list[Tensor]  # [micro-batch] d loss / d words
    scale_grad: Tensor
    rng: list[tuple]  # RNG state before each micro-batch's first forward pass

    def surrogate(self, i: int, sets: list[dict], words: Tensor, scale: Tensor, last: bool) -> Tensor:
        """A term whose gradient is the cached one: sum of <embedding, d loss / d embedding>."""
        s = sum(
            (out["mask_embed"] * g.to(out["mask_embed"].dtype)).sum()
            for out, g in zip(sets, self.embed_grads[i])
        )
        s = s + (words * self.word_grads[i].to(words.dtype)).sum()
        if last:  # the temperature's gradient, once per step
            s = s + (scale * self.scale_grad.to(scale.dtype)).sum()
        return s


def _cache_grounding_gradients(
    loss: ODISELoss,
    micro_batches: list[dict],
    forward: Forward,
    scale: Tensor,
    all_finite: Callable[[dict[str, Tensor]], bool],
) -> _GroundingCache | None:
    device = micro_batches[0]["images"].device
    rng, embeds, words = [], [], []
    with torch.no_grad():
        for mb in micro_batches:
            rng.append(_rng_state(device))
            outputs, w = forward(mb)
            embeds.append([out["mask_embed"].detach() for out in _prediction_sets(outputs)])
            words.append(w.detach())
    sizes = [len(w) for w in words]
    leaves = [torch.cat(per_set).requires_grad_(True) for per_set in zip(*embeds)]
    all_words = torch.cat(words).requires_grad_(True)
    valid = None
    if any(mb.get("words_valid") is not None for mb in micro_batches):
        valid = torch.cat(
            [
                mb["words_valid"] if mb.get("words_valid") is not None else torch.ones(n, dtype=torch.bool)
                for mb, n in zip(micro_batches, sizes)
            ]
        ).to(device)
    scale_leaf = scale.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        terms = loss.grounding_terms(leaves, all_words, scale_leaf, valid)
        if not all_finite({k: v.detach() for k, v in terms.items()}):
            return None
        total = sum(terms.values())
        grads = torch.autograd.grad(total, [*leaves, all_words, scale_leaf])
    embed_grads = [list(g.split(sizes)) for g in grads[: len(leaves)]]
    return _GroundingCache(
        terms={k: v.detach() for k, v in terms.items()},
        embed_grads=[list(per_mb) for per_mb in zip(*embed_grads)],
        word_grads=list(grads[len(leaves)].split(sizes)),
        scale_grad=grads[-1],
        rng=rng,
    )


def average_gradients(params: list[Tensor]) -> bool:
    """Every process's gradients replaced by their mean over processes (what DDP does), in one
    all-reduce of the gradients flattened together; returns whether the mean is finite (the same
    answer on every process). Every process must pass the same parameters.
    """
    world = world_size()
    if world == 1 or not params:
        return all(bool(torch.isfinite(p.grad).all()) for p in params)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
    return bool(torch.isfinite(flat).all())
