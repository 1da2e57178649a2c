import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from odise_pl.evaluation.runner import compute_evaluators, make_evaluators, update_evaluators

VOCAB, ISTHING = [["a"], ["b"], ["c"]], [True, True, False]


def _images(n=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        gt = rng.integers(0, 3, (12, 16))
        masks = torch.from_numpy(np.stack([gt == c for c in range(3)]))
        noisy = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 3, gt.shape))
        ids = torch.from_numpy(noisy + 1).int()
        segs = [
            {"id": c + 1, "category_id": c, "isthing": ISTHING[c], "score": 0.9}
            for c in range(3)
            if (noisy == c).any()
        ]
        sem = torch.from_numpy(np.stack([noisy == c for c in range(3)]).astype(np.float32))
        inst = {
            "masks": torch.from_numpy(np.stack([noisy == c for c in (0, 1)])),
            "labels": torch.tensor([0, 1]),
            "scores": torch.tensor([0.9, 0.8]),
        }
        pred = {"panoptic": (ids, segs), "semantic": sem, "instances": inst}
        tgt = {"masks": masks, "labels": torch.arange(3), "iscrowd": torch.zeros(3, dtype=torch.bool)}
        out.append((pred, tgt, {"image_id": i, "height": 12, "width": 16}))
    return out


def _worker(rank, world, port, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    evs = make_evaluators(VOCAB, ISTHING)
    for k, (p, t, m) in enumerate(_images()):
        if k % world == rank:
            update_evaluators(evs, p, t, m)
    out[rank] = compute_evaluators(evs)
    dist.destroy_process_group()


def test_two_processes_equal_one():
    evs = make_evaluators(VOCAB, ISTHING)
    for p, t, m in _images():
        update_evaluators(evs, p, t, m)
    single = compute_evaluators(evs)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, 29600 + os.getpid() % 1000, out), nprocs=2, join=True)
    for rank in range(2):
        assert out[rank] == pytest.approx(single)
    assert 0 < single["pq"] < 100 and 0 < single["miou"] < 100 and 0 < single["ap"] <= 100
