import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from odise_pl.loss.grounding import GroundingLoss


def loop_reference(z, w, scale, softmax_over):
    """Eq. 7-8 written as loops, float64; the two directions averaged (PARITY: the official
    MaskGroundingCriterion's 0.5 * (image-to-text + text-to-image))."""
    z = torch.nn.functional.normalize(z.double(), dim=-1)
    w = torch.nn.functional.normalize(w.double(), dim=-1)
    b, n, _ = z.shape
    k = w.shape[1]
    g = torch.zeros(b, b, dtype=torch.float64)
    for m in range(b):
        for c in range(b):
            sim = torch.tensor(
                [[float(z[m, i] @ w[c, kk]) for kk in range(k)] for i in range(n)], dtype=torch.float64
            )
            p = (scale * sim).softmax(0 if softmax_over == "queries" else 1)
            total = 0.0
            for kk in range(k):
                for i in range(n):
                    total += p[i, kk] * sim[i, kk]
            g[m, c] = total / k
    loss = 0.0
    for m in range(b):
        loss -= 0.5 * torch.log(torch.exp(scale * g[m, m]) / torch.exp(scale * g[m, :]).sum()) / b
        loss -= 0.5 * torch.log(torch.exp(scale * g[m, m]) / torch.exp(scale * g[:, m]).sum()) / b
    return loss


def masked_loop_reference(z, w, scale, valid):
    """The official masking of captions without a noun phrase, written as loops in float64:
    image -> text CE weighted by each image's own caption validity (sum of w_m CE_m / sum of w_m),
    text -> image CE times validity averaged over all captions; the mean of the two."""
    z = torch.nn.functional.normalize(z.double(), dim=-1)
    w = torch.nn.functional.normalize(w.double(), dim=-1)
    b = z.shape[0]
    g = torch.zeros(b, b, dtype=torch.float64)
    for m in range(b):
        for c in range(b):
            sim = z[m] @ w[c].t()  # (N, K)
            g[m, c] = ((scale * sim).softmax(0) * sim).sum(0).mean()
    i2t = [-torch.log(torch.exp(scale * g[m, m]) / torch.exp(scale * g[m, :]).sum()) for m in range(b)]
    t2i = [-torch.log(torch.exp(scale * g[c, c]) / torch.exp(scale * g[:, c]).sum()) for c in range(b)]
    v = [float(x) for x in valid]
    image_to_text = sum(vm * ce for vm, ce in zip(v, i2t)) / sum(v)
    text_to_image = sum(vc * ce for vc, ce in zip(v, t2i)) / b
    return 0.5 * (image_to_text + text_to_image)


def test_captions_without_nouns_are_masked_as_officially():
    torch.manual_seed(0)
    z, w = torch.randn(4, 5, 8), torch.randn(4, 3, 8)
    valid = torch.tensor([True, False, True, True])
    got = GroundingLoss()(z, w, torch.tensor(5.0), valid)
    torch.testing.assert_close(got.double(), masked_loop_reference(z, w, 5.0, valid), rtol=1e-5, atol=1e-6)
    # all valid: the unmasked loss; none valid: the official fallback (image -> text unweighted)
    all_valid = GroundingLoss()(z, w, torch.tensor(5.0), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(all_valid, GroundingLoss()(z, w, torch.tensor(5.0)))
    none = GroundingLoss()(z, w, torch.tensor(5.0), torch.zeros(4, dtype=torch.bool))
    assert torch.isfinite(none) and none > 0


@pytest.mark.parametrize("softmax_over", ["queries", "words"])
def test_grounding_equals_loop_reference(softmax_over):
    torch.manual_seed(0)
    z, w = torch.randn(3, 5, 8), torch.randn(3, 4, 8)
    scale = torch.tensor(7.0)
    got = GroundingLoss(softmax_over=softmax_over)(z, w, scale)
    torch.testing.assert_close(got.double(), loop_reference(z, w, 7.0, softmax_over), rtol=1e-5, atol=1e-6)


def test_matched_pairs_give_lower_loss():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 16)
    z_match = torch.cat([w, torch.randn(4, 5, 16)], dim=1)
    loss = GroundingLoss()
    assert loss(z_match, w, torch.tensor(20.0)) < loss(torch.randn(4, 8, 16), w, torch.tensor(20.0))


def _ddp_worker(rank, world, port, z, w, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    half = z.shape[0] // world
    zl = z[rank * half : (rank + 1) * half].clone().requires_grad_(True)
    wl = w[rank * half : (rank + 1) * half].clone().requires_grad_(True)
    loss = GroundingLoss()(zl, wl, torch.tensor(5.0))
    loss.backward()
    # DDP averages gradients over ranks; do the same here by hand.
    gz, gw = zl.grad.clone(), wl.grad.clone()
    out[rank] = (loss.detach(), gz / world, gw / world)
    dist.destroy_process_group()


def test_ddp_two_processes_see_the_global_batch():
    torch.manual_seed(0)
    z, w = torch.randn(4, 6, 8), torch.randn(4, 3, 8)
    zf, wf = z.clone().requires_grad_(True), w.clone().requires_grad_(True)
    full = GroundingLoss()(zf, wf, torch.tensor(5.0))
    full.backward()
    manager = mp.Manager()
    out = manager.dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, port, z, w, out), nprocs=2, join=True)
    for rank in range(2):
        loss, gz, gw = out[rank]
        torch.testing.assert_close(loss, full.detach())  # each rank's loss is the global-batch loss
        # after DDP's averaging, each rank's samples get exactly the single-process gradient
        torch.testing.assert_close(gz, zf.grad[rank * 2 : rank * 2 + 2])
        torch.testing.assert_close(gw, wf.grad[rank * 2 : rank * 2 + 2])
