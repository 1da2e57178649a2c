"""Resumable, deterministic training stream.

PARITY with detectron2's ``TrainingSampler`` (what the official code trains with): an infinite
stream of indices, reshuffled every pass over the data, sharded across processes; training is
measured in iterations, not epochs. Two additions make a resumed run reproduce an uninterrupted
one exactly:

* the stream is a pure function of ``(seed, position)``, so resuming at position ``p`` (derived from
  the restored global step) replays exactly what the uninterrupted run would have seen next;
* each sample carries its own seed, and its augmentation runs under that seed, so random crops and
  sampled nouns do not depend on worker count, prefetching or what ran before.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def _permutation(size: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=g).tolist()


class InfiniteSampler(Sampler):
    """Yields ``(index, sample_seed)`` forever, from global position ``start`` on.

    Position p (counted over all processes) is image ``perm_{p // size}[p % size]``; process
    ``rank`` of ``world`` takes positions ``rank, rank + world, ...`` of the global stream, so the
    global batch is the same whatever the number of processes.
    """

    def __init__(
        self, size: int, *, seed: int = 0, shuffle: bool = True, start: int = 0, rank: int = 0, world: int = 1
    ):
        if size <= 0:
            raise ValueError("the training set is empty")
        self.size, self.seed, self.shuffle, self.start, self.rank, self.world = (
            size,
            seed,
            shuffle,
            start,
            rank,
            world,
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:
        p = self.start + self.rank
        epoch, perm = -1, []
        while True:
            e = p // self.size
            if e != epoch:
                epoch = e
                perm = _permutation(self.size, self.seed, e) if self.shuffle else list(range(self.size))
            yield perm[p % self.size], self.seed * 1_000_003 + p
            p += self.world


class SeededDataset(Dataset):
    """Wraps a dataset so ``ds[(index, seed)]`` runs the item (and its transform) under ``seed``.

    Python's global ``random`` state is restored afterwards, so in-process loading (0 workers)
    leaves the training process's random state untouched. One caption is chosen here too (for the
    ``text`` captioner), under the same seed.
    """

    def __init__(self, dataset: Dataset, on_bad_sample: str = "raise", max_tries: int = 20):
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"data.on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
        self.dataset, self.on_bad_sample, self.max_tries = dataset, on_bad_sample, max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        state = random.getstate()
        random.seed(seed)
        try:
            item, skipped = self._load(index)
            item["bad_samples"] = skipped
            caps = item.get("captions") or []
            item["caption"] = random.choice(caps) if caps else ""
            item["seed"] = seed  # also seeds the loss's random point sampling for this sample
            return item
        finally:
            random.setstate(state)

    def _load(self, index: int) -> tuple[dict, int]:
        """The item, or with ``skip`` the next loadable one (deterministically), and how many were bad."""
        from odise_pl.errors import DatasetError

        for k in range(self.max_tries):
            try:
                return self.dataset[(index + k) % len(self.dataset)], k
            except DatasetError as err:
                if self.on_bad_sample == "raise":
                    raise DatasetError(
                        f"{err} (set data.on_bad_sample=skip to skip and count bad samples)"
                    ) from err
                warnings.warn(f"skipping a bad sample: {err}", stacklevel=2)
        raise DatasetError(f"{self.max_tries} consecutive bad samples from index {index}: check the dataset")

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
