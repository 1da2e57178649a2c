import glob
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from odise_pl.train import CONFIG_DIR, build, train

FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=null",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.synthetic.num_train=4",
    "data.synthetic.num_val=2",
    "trainer.enable_model_summary=false",
    "callbacks.progress.refresh_rate=0",
]


def cfg_for(tmp_path, *overrides, fast=True):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path}/out",
                *(FAST if fast else []),
                *overrides,
            ],
        )


def test_unknown_key_fails_at_startup(tmp_path):
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        cfg_for(tmp_path, "model.net.no_such_key=1")
    cfg = cfg_for(tmp_path, "+model.net.pyramid.no_such_arg=1")
    with pytest.raises(hydra.errors.InstantiationException, match="no_such_arg"):
        build(cfg)


def test_every_experiment_composes(tmp_path):
    for f in sorted(Path(CONFIG_DIR, "experiment").glob("*.yaml")):
        cfg = cfg_for(tmp_path, f"experiment={f.stem}", fast=False)
        assert cfg.model.net._target_.endswith("ODISE")


def test_entry_point_trains_validates_and_saves_trainable_only(tmp_path, capsys):
    cfg = cfg_for(tmp_path, "callbacks.model_checkpoint.every_n_train_steps=2")
    metrics = train(cfg)
    assert "val/pq" in metrics
    assert "after training:  val/pq=" in capsys.readouterr().out
    ckpts = sorted(glob.glob(f"{tmp_path}/out/checkpoints/*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    keys = list(state["state_dict"])
    assert keys and not [
        k
        for k in keys
        if k.startswith(("net.backbone.", "net.clip.", "net.text_encoder.", "net.captioner.clip."))
    ]
    assert any(k.startswith("net.captioner.proj") for k in keys)
    assert state["optimizer_states"] and state["lr_schedulers"]
    # resume exactly: continue from the step-4 checkpoint to step 6
    cfg2 = cfg_for(tmp_path, "trainer.max_steps=6", f"ckpt_path={tmp_path}/out/checkpoints/last.ckpt")
    datamodule, module, trainer = build(cfg2)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg2.ckpt_path)
    assert trainer.global_step == 6


def _fixed_batch_module(tmp_path, supervision):
    cfg = cfg_for(tmp_path, f"model.supervision={supervision}", "model.warmup_steps=0")
    datamodule, module, _ = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module.set_vocabulary(datamodule.vocabulary, datamodule.isthing)
    batch = next(iter(datamodule.train_dataloader()))
    return module, batch


@pytest.mark.parametrize("supervision", ["label", "caption"])
def test_loss_decreases_over_50_steps(tmp_path, supervision):
    torch.manual_seed(0)
    module, batch = _fixed_batch_module(tmp_path, supervision)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(50):
        loss = sum(module.compute_losses(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    key = "loss_ground" if supervision == "caption" else "loss_ce"
    assert key in module.compute_losses(batch)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses[::10]


def test_frozen_parts_get_no_gradient_and_stay_bit_identical(tmp_path):
    module, batch = _fixed_batch_module(tmp_path, "label")
    frozen = {n: p.detach().clone() for m in module.net.frozen_modules() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)  # deliberately given everything
    loss = sum(module.compute_losses(batch).values())
    loss.backward()
    for m in module.net.frozen_modules():
        assert all(p.grad is None for p in m.parameters())
    assert (
        module.net.captioner.alpha.grad is not None
    )  # the implicit captioner trains through the frozen UNet
    opt.step()
    for m in module.net.frozen_modules():
        for n, p in m.named_parameters():
            assert torch.equal(p, frozen[n]), n
        assert not m.training
