"""LightningDataModule: COCO-panoptic-format datasets, LSJ for training, batching with targets."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from odise_pl.data.nouns import SampleWords
from odise_pl.data.sampler import InfiniteSampler, SeededDataset
from odise_pl.data.transforms import pad_to_divisible, select_segments


class Compose:
    """Apply item transforms in order."""

    def __init__(self, transforms: list[Callable]):
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, item: dict) -> dict:
        for t in self.transforms:
            item = t(item)
        return item


def collate(items: list[dict], size_divisibility: int = 64) -> dict:
    """Items -> ``images: (B, 3, H, W) uint8`` zero-padded to a multiple of ``size_divisibility``,
    ``targets``: per image ``masks (N, H, W)`` (padded like the image when the transform resized
    both; at the original size when only the image was resized, for evaluation), ``labels``, ``isthing``,
    ``iscrowd``; ``captions``: one caption per image (for the ``text`` captioner);
    ``words``: (B lists of K) sampled nouns when present; ``meta``: ids, original and input sizes.
    """
    images, sizes = pad_to_divisible([it["image"] for it in items], size_divisibility)
    hh, ww = images.shape[-2:]
    targets = []
    for it in items:
        m = it["masks"]
        if m.shape[-2:] == it["image"].shape[-2:]:  # training: masks follow the image, so pad alike
            padded = m.new_zeros(m.shape[0], hh, ww)
            padded[:, : m.shape[-2], : m.shape[-1]] = m
            m = padded
        # else (evaluation): ground truth stays at the original resolution, predictions are resized to it
        targets.append(
            {
                "masks": m,
                "labels": it["labels"],
                "isthing": it["isthing"],
                "iscrowd": it["iscrowd"],
                "seed": it.get("seed"),
            }
        )
    batch = {
        "images": images,
        "targets": targets,
        # The training stream picks a caption per sample under that sample's seed; evaluation takes the first.
        "captions": [it.get("caption", it["captions"][0] if it["captions"] else "") for it in items],
        "meta": [
            {
                "image_id": it["image_id"],
                "file_name": it["file_name"],
                "height": it["height"],
                "width": it["width"],
                "input_size": s,
            }
            for it, s in zip(items, sizes)
        ],
    }
    batch["bad_samples"] = sum(it.get("bad_samples", 0) for it in items)
    if all("words" in it for it in items):
        batch["words"] = [it["words"] for it in items]
        # False: the caption had no noun phrase (its words are empty; the grounding loss masks it)
        batch["words_valid"] = torch.tensor([bool(it.get("words_valid", True)) for it in items])
    return batch


def sharded_loader(
    dataset, trainer: L.Trainer | None, batch_size: int, num_workers: int, size_divisibility: int
) -> DataLoader:
    """An evaluation loader of this process's images: rank, rank + world, ... Every image is
    evaluated exactly once (a DistributedSampler pads with repeats, which the metrics would count
    twice); the metrics synchronise their states across processes.
    """
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    return DataLoader(
        torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world))),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=functools.partial(collate, size_divisibility=size_divisibility),
        pin_memory=torch.cuda.is_available(),
    )


def _drop_crowd(item: dict) -> dict:
    # PARITY with Mask2Former's COCO panoptic mapper: crowd regions are not training targets.
    return select_segments(item, ~item["iscrowd"])


class ODISEDataModule(L.LightningDataModule):
    """Serves training batches (LSJ, nouns for caption supervision) and validation batches.

    Args:
        train_dataset, val_dataset: partials of a dataset class taking ``transform=``
            (``COCOPanopticDataset``); built in ``setup`` so a generated dataset exists by then.
        train_transform, val_transform: item transforms (``LSJ`` / ``ResizeShortestEdge``).
        batch_size: per-device training batch size; val_batch_size likewise.
        num_workers: DataLoader workers.
        k_words: nouns sampled per image for caption supervision (0: off).
        noun_rules: ``official`` | ``ours`` (:func:`odise_pl.data.nouns.extract_nouns`).
        size_divisibility: pad inputs to a multiple of this (64 for SD).
        synthetic: if set (``{root, num_train, num_val, seed}``), write the synthetic dataset there
            when it does not exist yet (the default experiment runs out of the box).
        seed: seed of the training stream (order and per-sample augmentation).
        global_batch_size: if set, ``batch_size`` is the per-device maximum and the entry point
            derives per-device batch and gradient accumulation from the number of devices.
        on_bad_sample: ``raise`` (default: stop with the file and the fix) or ``skip`` (train on the
            next sample instead; the count is reported at the end of training).

    Training is an infinite, deterministic stream (:class:`~odise_pl.data.sampler.InfiniteSampler`),
    as detectron2 trains: set ``trainer.max_steps`` and an integer ``trainer.val_check_interval``.
    On resume the stream restarts exactly where the checkpointed step left it.
    """

    def __init__(
        self,
        *,
        train_dataset: Callable,
        val_dataset: Callable,
        train_transform: Callable | None = None,
        val_transform: Callable | None = None,
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 2,
        k_words: int = 8,
        noun_rules: str = "official",
        size_divisibility: int = 64,
        synthetic: dict | None = None,
        seed: int = 0,
        global_batch_size: int | None = None,
        on_bad_sample: Literal["raise", "skip"] = "raise",
    ):
        super().__init__()
        self.train_factory, self.val_factory = train_dataset, val_dataset
        self.train_transform, self.val_transform = train_transform, val_transform
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.k_words, self.size_divisibility, self.synthetic = k_words, size_divisibility, synthetic
        self.noun_rules = noun_rules
        self.seed, self.global_batch_size, self.on_bad_sample = seed, global_batch_size, on_bad_sample
        self.train_set = self.val_set = None

    def prepare_data(self) -> None:
        if self.synthetic:
            from odise_pl.data.synthetic import ensure_dataset

            ensure_dataset(
                self.synthetic["root"],
                self.synthetic.get("num_train", 64),
                self.synthetic.get("num_val", 16),
                self.synthetic.get("seed", 0),
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self.train_factory()
            # Nouns for caption supervision only where the dataset has captions (label supervision
            # trains without any: data.train_dataset.captions=false).
            words = (
                SampleWords(self.k_words, rules=self.noun_rules)
                if self.k_words and self.train_set.provides_captions
                else None
            )
            self.train_set.transform = Compose([self.train_transform, _drop_crowd, words])
        if self.val_set is None:
            self.val_set = self.val_factory(transform=self.val_transform)

    @property
    def vocabulary(self) -> list[list[str]]:
        """Category names of the (validation) dataset, one synonym list per category."""
        ds = self.val_set or self.train_set
        return [[n] for n in ds.class_names]

    @property
    def categories(self) -> list[dict]:
        """The (validation) dataset's categories, ``{"id", "name", ...}``, in contiguous order."""
        return list((self.val_set or self.train_set).categories)

    @property
    def isthing(self) -> list[bool]:
        return list((self.val_set or self.train_set).isthing)

    def _stream_start(self) -> tuple[int, int, int]:
        """(global sample position, rank, world) where training (re)starts: from the restored step."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 1
        world = trainer.world_size
        consumed_batches = trainer.global_step * trainer.accumulate_grad_batches
        return consumed_batches * self.batch_size * world, trainer.global_rank, world

    def train_dataloader(self) -> DataLoader:
        start, rank, world = self._stream_start()
        sampler = InfiniteSampler(len(self.train_set), seed=self.seed, start=start, rank=rank, world=world)
        return DataLoader(
            SeededDataset(self.train_set, self.on_bad_sample),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            collate_fn=functools.partial(collate, size_divisibility=self.size_divisibility),
            pin_memory=torch.cuda.is_available(),
            # Its own generator: creating the iterator must not consume the global RNG, which a
            # resumed run restores from the checkpoint.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return sharded_loader(
            self.val_set, self.trainer, self.val_batch_size, self.num_workers, self.size_divisibility
        )
