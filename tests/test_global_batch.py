"""One step's losses over the global batch however it is split (issue: parity round two, item 2).

In float64, with the real losses (Hungarian matching, point-sampled mask losses seeded per sample,
the grounding loss, the objectness / category cross-entropy): 1 process x 4 accumulation steps ==
2 processes x 2 == 4 processes x 1 == the whole batch at once, in every loss term and in the
gradient of every trainable parameter, DDP's gradient averaging done by hand over gloo processes.
"""

from __future__ import annotations

import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from odise_pl.loss.criterion import SetCriterion
from odise_pl.loss.global_batch import global_batch_step
from odise_pl.loss.grounding import GroundingLoss
from odise_pl.loss.matcher import HungarianMatcher
from odise_pl.loss.odise_loss import ODISELoss
from odise_pl.train import build

from test_train import cfg_for

FEATURES, QUERIES, SIDE, DIM, CLASSES, TEXT, WORDS, SETS = 6, 5, 8, 4, 3, 5, 3, 3
BATCH = 4


class ToyNet(nn.Module):
    """ODISE's outputs (masks, mask embeddings, class or objectness logits, auxiliary sets, word
    embeddings through a trainable projection) as a differentiable function of per-image features."""

    def __init__(self, caption: bool):
        super().__init__()
        torch.manual_seed(0)
        width = 2 if caption else CLASSES + 1
        self.key = "pred_objectness" if caption else "pred_logits"
        self.trunk = nn.Linear(FEATURES, 16)
        self.masks = nn.ModuleList(nn.Linear(16, QUERIES * SIDE * SIDE) for _ in range(SETS))
        self.embed = nn.ModuleList(nn.Linear(16, QUERIES * DIM) for _ in range(SETS))
        self.logits = nn.ModuleList(nn.Linear(16, QUERIES * width) for _ in range(SETS))
        self.text_proj = nn.Linear(TEXT, DIM)
        self.scale = nn.Parameter(torch.tensor(4.0))
        self.width = width
        self.double()

    def forward(self, batch: dict):
        h = torch.tanh(self.trunk(batch["images"]))
        b = h.shape[0]
        sets = [
            {
                "pred_masks": 3 * self.masks[i](h).view(b, QUERIES, SIDE, SIDE),
                "mask_embed": self.embed[i](h).view(b, QUERIES, DIM),
                self.key: self.logits[i](h).view(b, QUERIES, self.width),
            }
            for i in range(SETS)
        ]
        outputs = {**sets[-1], "aux_outputs": sets[:-1]}
        words = self.text_proj(batch["words"]) if "words" in batch else None
        return outputs, words


def _data(caption: bool) -> list[dict]:
    """BATCH single-image samples: some with several targets, one with none, one caption with no
    noun (invalid), each with its own point-sampling seed."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for i, n in enumerate([3, 0, 2, 4][:BATCH]):
        masks = torch.rand(n, SIDE, SIDE, generator=g) > 0.6
        sample = {
            "images": torch.randn(1, FEATURES, generator=g, dtype=torch.float64),
            "targets": [
                {"masks": masks, "labels": torch.randint(0, CLASSES, (n,), generator=g), "seed": 100 + i}
            ],
        }
        if caption:
            sample["words"] = torch.randn(1, WORDS, TEXT, generator=g, dtype=torch.float64)
            sample["words_valid"] = torch.tensor([i != 2])
        samples.append(sample)
    return samples


def _collate(samples: list[dict]) -> dict:
    out = {
        "images": torch.cat([s["images"] for s in samples]),
        "targets": sum((s["targets"] for s in samples), []),
    }
    if "words" in samples[0]:
        out["words"] = torch.cat([s["words"] for s in samples])
        out["words_valid"] = torch.cat([s["words_valid"] for s in samples])
    return out


def _loss(caption: bool, class_normaliser: str) -> ODISELoss:
    criterion = SetCriterion(
        matcher=HungarianMatcher(num_points=48), num_points=48, class_normaliser=class_normaliser
    )
    return ODISELoss(
        criterion=criterion,
        grounding=GroundingLoss(),
        supervision="caption" if caption else "label",
        objectness=caption,
    )


def _step(caption: bool, class_normaliser: str, samples: list[dict], accumulate: int):
    """This process's step over ``samples`` in ``accumulate`` micro-batches -> (terms, gradients),
    both averaged over processes as DDP would."""
    net, loss = ToyNet(caption), _loss(caption, class_normaliser)
    per = len(samples) // accumulate
    micro = [_collate(samples[i * per : (i + 1) * per]) for i in range(accumulate)]
    step = global_batch_step(
        loss, micro, net, backward=lambda v: v.backward(), scale=net.scale, num_queries=QUERIES
    )
    step.last.backward()
    grads = _grads(net)
    terms = dict(step.terms)
    if dist.is_initialized():
        world = dist.get_world_size()
        for t in [*grads.values(), *terms.values()]:
            dist.all_reduce(t)
            t /= world
    return terms, grads


def _worker(rank, world, port, caption, class_normaliser, accumulate, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        samples = _data(caption)
        per = len(samples) // world
        out[rank] = _step(caption, class_normaliser, samples[rank * per : (rank + 1) * per], accumulate)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(caption: bool, class_normaliser: str, processes: int, accumulate: int):
    if processes == 1:
        return _step(caption, class_normaliser, _data(caption), accumulate)
    out = mp.Manager().dict()
    mp.spawn(
        _worker,
        args=(processes, _free_port(), caption, class_normaliser, accumulate, out),
        nprocs=processes,
        join=True,
    )
    terms, grads = out[0]
    for rank in range(1, processes):  # every process ends with the same averaged values
        for k in grads:
            torch.testing.assert_close(out[rank][1][k], grads[k], rtol=0, atol=0)
    return terms, grads


def _whole_batch(caption: bool, class_normaliser: str):
    """The reference: the whole batch through the plain losses at once, one process."""
    net, loss = ToyNet(caption), _loss(caption, class_normaliser)
    batch = _collate(_data(caption))
    outputs, words = net(batch)
    terms = loss(outputs, batch["targets"], words, net.scale, batch.get("words_valid"))
    sum(terms.values()).backward()
    return {k: v.detach() for k, v in terms.items()}, _grads(net)


def _grads(net: ToyNet) -> dict:
    """Gradients of the trainable parameters the supervision uses (label: not the embeddings and text side)."""
    unused = () if net.key == "pred_objectness" else ("text_proj", "scale", "embed")
    return {k: p.grad.clone() for k, p in net.named_parameters() if not k.startswith(unused)}


def _assert_same(got, ref, what):
    (terms, grads), (ref_terms, ref_grads) = got, ref
    assert set(terms) == set(ref_terms) and set(grads) == set(ref_grads), what
    for k in ref_terms:
        torch.testing.assert_close(
            terms[k], ref_terms[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{what} {k}: {m}"
        )
    for k in ref_grads:
        assert ref_grads[k].abs().max() > 0, k  # every parameter is trained by the step
        torch.testing.assert_close(
            grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{what} {k}: {m}"
        )


@pytest.mark.parametrize("caption", [True, False], ids=["caption", "label"])
def test_every_split_of_the_global_batch_gives_the_same_step(caption):
    ref = _whole_batch(caption, "global")
    assert (ref[0].get("loss_ground", torch.tensor(1.0)) > 0).all()
    for processes, accumulate in [(1, 4), (2, 2), (4, 1), (1, 2)]:
        _assert_same(_split(caption, "global", processes, accumulate), ref, f"{processes} x {accumulate}")


def test_the_official_class_normaliser_is_each_micro_batchs_mean():
    """class_normaliser=micro_batch (the default, PARITY): the cross-entropy is the mean of the
    micro-batches' weighted means, whichever processes they run on; everything else stays global."""
    one_by_four, four_by_one = _split(True, "micro_batch", 1, 4), _split(True, "micro_batch", 4, 1)
    _assert_same(four_by_one, one_by_four, "4 x 1 vs 1 x 4")
    # ... and differs from the global weighted mean in the cross-entropy only
    whole = _whole_batch(True, "global")
    assert not torch.allclose(one_by_four[0]["loss_ce"], whole[0]["loss_ce"])
    for k in ("loss_mask", "loss_dice", "loss_ground"):
        torch.testing.assert_close(one_by_four[0][k], whole[0][k], rtol=1e-10, atol=1e-12)


def test_a_skipped_micro_batch_skips_the_step():
    net, loss = ToyNet(True), _loss(True, "global")
    samples = _data(True)
    micro = [_collate(samples[:2]), _collate(samples[2:])]
    micro[1]["images"] = micro[1]["images"] * float("nan")
    step = global_batch_step(
        loss, micro, net, backward=lambda v: v.backward(), scale=net.scale, num_queries=QUERIES
    )
    assert step is None


class _FirstStepGradients(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {
            k: p.grad.detach().clone() for k, p in pl_module.named_parameters() if p.grad is not None
        }
        self.loss = float(trainer.callback_metrics["train/loss"])
        trainer.should_stop = True


def _first_step(tmp_path, per_device: int):
    cfg = cfg_for(
        tmp_path,
        "model.supervision=caption",
        "model.net.transformer_decoder.objectness=true",
        "model.criterion.class_normaliser=global",
        "data.global_batch_size=4",
        f"data.batch_size={per_device}",
        "trainer.max_steps=1",
        "trainer.gradient_clip_val=null",
        f"paths.output_dir={tmp_path}/out{per_device}",
    )
    datamodule, module, trainer = build(cfg)
    assert trainer.accumulate_grad_batches == 4 // per_device
    record = _FirstStepGradients()
    trainer.callbacks.append(record)
    trainer.fit(module, datamodule=datamodule)
    return record


def test_training_with_accumulation_takes_the_step_of_the_whole_batch(tmp_path):
    """The real tiny model through Lightning: batch 4 at once, 2 x 2 and 4 x 1 accumulated give the
    same first-step loss and gradients (float32: within rounding of the sums, derived below)."""
    whole = _first_step(tmp_path, 4)
    assert any("classifier" in k for k in whole.grads) and len(whole.grads) > 20
    for per_device in (2, 1):
        split = _first_step(tmp_path, per_device)
        assert split.loss == pytest.approx(whole.loss, rel=1e-5)
        assert set(split.grads) == set(whole.grads)
        num = sum(
            float((split.grads[k].double() - whole.grads[k].double()).pow(2).sum()) for k in whole.grads
        )
        den = sum(float(whole.grads[k].double().pow(2).sum()) for k in whole.grads)
        # float32 forward passes over different batch shapes: relative error ~1e-6 per operation,
        # a few hundred operations deep
        assert (num / den) ** 0.5 < 1e-3, (per_device, (num / den) ** 0.5)
