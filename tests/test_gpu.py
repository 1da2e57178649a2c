"""The CUDA path (``pytest -m gpu``; skipped without CUDA). benchmarks/gpu/run.sh runs these first on
the GPU machine.

``ODISE_TEST_DEVICE`` (default ``cuda``) names the device; ``cpu`` runs the same checks here (the
rehearsal of run.sh), where ``grid_sample`` and bf16 autocast exist too. ``ODISE_TEST_FULL=0``
swaps the full-size training steps for the tiny experiment (the CPU rehearsal cannot afford them).
"""

from __future__ import annotations

import copy
import glob
import os

import pytest
import torch

from conftest import make_backbone, make_odise

DEVICE = os.environ.get("ODISE_TEST_DEVICE", "cuda")
FULL = os.environ.get("ODISE_TEST_FULL", "1") != "0"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="no CUDA device (ODISE_TEST_DEVICE=cpu runs these checks on the CPU)",
    ),
]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_grid_sample_deform_attn_equals_cpu_gather_values_and_gradients():
    """What ``auto`` picks on CUDA (grid_sample) against the CPU gather kernel, in float64."""
    from odise_pl.model.ops.deform_attn import ms_deform_attn

    g = torch.Generator().manual_seed(0)
    shapes = [(16, 20), (8, 10), (4, 5)]
    b, lq, m, dh, p = 2, 37, 4, 8, 4
    value = torch.randn(b, sum(h * w for h, w in shapes), m, dh, generator=g, dtype=torch.float64)
    # some locations outside [0, 1]: the zero padding has to agree too
    loc = torch.rand(b, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    w = torch.rand(b, lq, m, len(shapes), p, generator=g, dtype=torch.float64).softmax(-1)
    grad_out = torch.randn(b, lq, m * dh, generator=g, dtype=torch.float64)
    results = {}
    for impl, dev in (("gather", "cpu"), ("auto", DEVICE)):
        ins = [t.to(dev).requires_grad_(True) for t in (value, loc, w)]
        out = ms_deform_attn(ins[0], shapes, ins[1], ins[2], impl=impl)
        out.backward(grad_out.to(dev))
        results[impl] = [out.detach().cpu()] + [t.grad.cpu() for t in ins]
    for name, a, b_ in zip(
        ("values", "d value", "d locations", "d weights"), results["auto"], results["gather"]
    ):
        assert rel(a, b_) < 1e-10, name


@pytest.fixture(scope="module")
def nets(tiny_text_encoder, tiny_clip):
    """The tiny ODISE in fp32 (reference) and with bf16 frozen weights, on the device."""
    ref = make_odise(make_backbone(), tiny_text_encoder, copy.deepcopy(tiny_clip)).eval()
    fast = copy.deepcopy(ref)
    fast.backbone.set_execution(dtype="bf16")
    fast.clip.set_image_dtype("bf16")
    return ref.to(DEVICE), fast.to(DEVICE)


def test_bf16_autocast_is_finite_and_close_to_fp32(nets):
    from odise_pl.inference.predictor import Predictor

    ref_net, fast_net = nets
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    meta = [{"input_size": (256, 256), "height": 256, "width": 256}]
    vocab, isthing = [["sky"], ["grass"], ["circle"]], [False, False, True]
    with torch.no_grad():
        ref = ref_net(images)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            out = fast_net(images)
    for k in ("pred_masks", "mask_embed"):
        assert torch.isfinite(out[k]).all(), k
        # the bound of tests/test_optimised_inference.py (bf16 keeps 8 mantissa bits)
        assert rel(out[k], ref[k]) < 0.10, k
    a = Predictor(ref_net, precision="fp32")(images, meta, vocab, isthing, tasks=("semantic",))[0]
    b = Predictor(fast_net, precision="bf16")(images, meta, vocab, isthing, tasks=("semantic",))[0]
    assert torch.isfinite(b["semantic"]).all() and b["semantic"].dtype == torch.float32
    assert (a["semantic"].argmax(0) == b["semantic"].argmax(0)).float().mean() > 0.9


def _trainer_overrides(tmp_path, steps: int) -> list[str]:
    accel = "gpu" if DEVICE.startswith("cuda") else "cpu"
    return [
        f"trainer.accelerator={accel}",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=1000",
        "trainer.enable_model_summary=false",
        "callbacks.progress.refresh_rate=0",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "data.num_workers=0",
        "data.global_batch_size=null",
        f"data.synthetic={{root: {tmp_path}/syn, num_train: 4, num_val: 1, seed: 0}}",
        f"data.train_dataset.root={tmp_path}/syn",
        "logger=csv",
    ]


class _LossLog:
    """Callback recording every training loss and whether the trained weights stay finite."""

    def __init__(self):
        self.losses, self.finite_weights = [], []

    def hook(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.finite_weights.append(
            all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)
        )


def test_bf16_mixed_training_steps_stay_finite(tmp_path):
    """A few full-size bf16-mixed steps (random weights, batch 1 at 512^2, bf16 frozen parts,
    UNet checkpointing) keep the loss and every trained weight finite."""
    import lightning as L

    from odise_pl.train import build

    from test_train import cfg_for

    if FULL:
        size = [
            "experiment=caption_512",
            "weights.mode=random",
            "data.batch_size=1",
            "model.train_vocabulary=dataset",
            "model.net.backbone.dtype=bf16",
            "model.net.clip.dtype=bf16",
            "model.net.backbone.gradient_checkpointing=true",
        ]
    else:
        size = ["data.batch_size=2", "model.net.backbone.dtype=bf16"]
    datamodule, module, trainer = build(
        cfg_for(tmp_path, *size, *_trainer_overrides(tmp_path, 3), fast=False)
    )
    log = _LossLog()
    cb = L.Callback()
    cb.on_train_batch_end = log.hook
    trainer.callbacks.append(cb)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 3
    assert len(log.losses) == 3 and all(torch.isfinite(torch.tensor(log.losses))), log.losses
    assert all(log.finite_weights)


def test_checkpoint_saved_on_device_loads_on_cpu(tmp_path):
    from odise_pl.checkpoints import read_checkpoint
    from odise_pl.inference.segment import load_model
    from odise_pl.train import build

    from test_train import cfg_for

    datamodule, module, trainer = build(
        cfg_for(tmp_path, "data.batch_size=2", *_trainer_overrides(tmp_path, 1), fast=False)
    )
    trainer.fit(module, datamodule=datamodule)
    ckpt = sorted(glob.glob(f"{tmp_path}/out/checkpoints/last*.ckpt"))[-1]
    assert read_checkpoint(ckpt)["state_dict"]  # weights_only, mapped to the CPU
    loaded, _ = load_model(checkpoint=ckpt)  # rebuilt from the file alone, on the CPU
    trained = {k: v.detach().cpu() for k, v in module.net.trainable_state_dict().items()}
    mine = loaded.net.trainable_state_dict()
    assert trained.keys() == mine.keys()
    for k, v in trained.items():
        assert mine[k].device.type == "cpu"
        torch.testing.assert_close(mine[k], v, rtol=0, atol=0, msg=k)
