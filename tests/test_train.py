import glob
import logging
import re
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from PIL import Image

from odise_pl.config import CONFIG_DIR
from odise_pl.errors import ConfigError, find_user_error
from odise_pl.model.odise import to_unit
from odise_pl.train import build, train

FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=1000",
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


def test_entry_point_trains_validates_and_saves_trainable_only(tmp_path, caplog):
    cfg = cfg_for(
        tmp_path, "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.progress.log_every=2"
    )
    caplog.set_level(logging.INFO, logger="odise_pl")
    metrics = train(cfg)
    assert {"val/pq", "val/pq_th", "val/pq_st", "val/miou", "val/ap"} <= set(metrics)
    out = caplog.text
    assert "after training:  PQ " in out and "mIoU " in out and "AP " in out
    # progress in optimiser steps of max_steps, with the rate and an ETA
    assert re.search(r"step 2/4 \(50.0%\)  [0-9.]+ s/step  ETA \d\d:\d\d", out), out
    # the resolved config and the code version are logged; sample predictions are rendered
    hparams = next((tmp_path / "out" / "csv").glob("version_*/hparams.yaml")).read_text()
    assert "git_commit" in hparams and "supervision: label" in hparams
    pngs = list((tmp_path / "out" / "visualizations").glob("*.png"))
    assert pngs and Image.open(pngs[0]).size[0] > 0
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


def _fixed_batch_module(tmp_path, supervision, *overrides):
    if supervision == "caption":  # as the caption_* experiments: with the binary objectness head
        overrides = ("model.net.transformer_decoder.objectness=true", *overrides)
    cfg = cfg_for(tmp_path, f"model.supervision={supervision}", *overrides)
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
    final = module.compute_losses(batch)
    assert "loss_ce" in final and ("loss_ground" in final) == (supervision == "caption")
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses[::10]


def test_caption_objectness_is_a_one_class_problem(tmp_path):
    """Caption supervision trains the binary head with the category loss on 2 columns: every
    target is class 0 ("object"), so the loss equals the criterion's on relabelled targets."""
    torch.manual_seed(0)
    module, batch = _fixed_batch_module(tmp_path, "caption")
    torch.manual_seed(1)
    losses = module.compute_losses(batch)
    torch.manual_seed(1)
    outputs = module.net(to_unit(batch["images"]), batch.get("captions"))
    for out in [outputs, *outputs["aux_outputs"]]:
        assert out["pred_objectness"].shape[-1] == 2
        out["pred_logits"] = out["pred_objectness"]
    zeros = [{**t, "labels": torch.zeros_like(t["labels"])} for t in batch["targets"]]
    ref = module.loss.criterion(outputs, zeros)
    torch.testing.assert_close(losses["loss_ce"], ref["loss_ce"])
    assert any(len(t["labels"]) and t["labels"].max() > 0 for t in batch["targets"])  # relabelling mattered


def test_objectness_head_and_supervision_must_agree(tmp_path):
    with pytest.raises(hydra.errors.InstantiationException) as err:
        _fixed_batch_module(tmp_path, "label", "model.net.transformer_decoder.objectness=true")
    # what the train / eval mains print as their one-line error
    assert isinstance(find_user_error(err.value), ConfigError)
    assert "objectness=true is the caption models" in str(find_user_error(err.value))
    cfg = cfg_for(tmp_path, "model.supervision=caption")
    with pytest.warns(UserWarning, match="without the objectness head"):
        build(cfg)


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


class _RecordLosses(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


class _StopAfter(L.Callback):
    """Ends training after ``steps`` steps of a longer run (an interruption: the schedule, which
    follows trainer.max_steps, stays the full run's)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def _run(tmp_path, out, max_steps, ckpt_path=None, workers=0, stop_after=None):
    cfg = cfg_for(
        tmp_path,
        f"trainer.max_steps={max_steps}",
        f"paths.output_dir={out}",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        f"data.num_workers={workers}",
        "data.synthetic.num_train=5",
    )  # 5 images, batch 2: batches straddle passes over the data
    datamodule, module, trainer = build(cfg)
    rec = _RecordLosses()
    trainer.callbacks.append(rec)
    if stop_after:
        trainer.callbacks.append(_StopAfter(stop_after))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    trained = {k: v.clone() for k, v in module.net.trainable_state_dict().items()}
    return rec.losses, trained


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, w_full = _run(tmp_path, tmp_path / "a", 6)
    first, _ = _run(tmp_path, tmp_path / "b", 6, stop_after=3)
    resumed, w_resumed = _run(
        tmp_path, tmp_path / "c", 6, ckpt_path=tmp_path / "b" / "checkpoints" / "last.ckpt"
    )
    assert sorted(resumed) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first[step] == pytest.approx(full[step], rel=1e-6)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), (step, resumed, full)
    for k in w_full:
        torch.testing.assert_close(w_resumed[k], w_full[k], rtol=1e-5, atol=1e-6)


def test_stream_is_independent_of_worker_count(tmp_path):
    zero, _ = _run(tmp_path, tmp_path / "w0", 3, workers=0)
    two, _ = _run(tmp_path, tmp_path / "w2", 3, workers=2)
    assert [two[s] for s in (1, 2, 3)] == pytest.approx([zero[s] for s in (1, 2, 3)], rel=1e-6)


def test_global_batch_split():
    from odise_pl.train import split_global_batch

    assert split_global_batch(64, 8, 8) == (8, 1)
    assert split_global_batch(64, 8, 2) == (8, 4)
    assert split_global_batch(64, 8, 1) == (8, 8)
    assert split_global_batch(64, 3, 4) == (2, 8)
    with pytest.raises(ValueError, match="divisible"):
        split_global_batch(64, 8, 3)


def test_text_proj_maps_clip_to_any_mask_embedding_width(tmp_path):
    # PARITY: text_proj = Linear(CLIP's width, projection dim); the mask embedding need not be CLIP-wide
    net = build(cfg_for(tmp_path, "model.net.transformer_decoder.embed_dim=48"))[1].net
    assert net.classifier.text_proj.in_features == net.clip.embed_dim == 32
    assert net.classifier.text_proj.out_features == net.transformer_decoder.embed_dim == 48


def test_a_training_vocabulary_that_does_not_fit_the_dataset_is_refused(tmp_path):
    from odise_pl.errors import VocabularyError

    with pytest.raises(
        VocabularyError, match="train_vocabulary=coco does not describe .*train_vocabulary=dataset"
    ):
        train(cfg_for(tmp_path, "model.train_vocabulary=coco"))


class _RecordLR(L.Callback):
    def __init__(self):
        self.lrs = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs[trainer.global_step] = [g["lr"] for g in trainer.optimizers[0].param_groups]


def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path, caplog):
    """The fix our own non-finite-loss message recommends: resume with a lower model.optimizer.lr."""

    def run(out, *overrides, ckpt=None):
        cfg = cfg_for(
            tmp_path,
            f"paths.output_dir={out}",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            *overrides,
        )
        datamodule, module, trainer = build(cfg)
        rec = _RecordLR()
        trainer.callbacks.append(rec)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        return rec.lrs, module

    first, _ = run(tmp_path / "a", "trainer.max_steps=2", "model.optimizer.lr=1e-3")
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    caplog.set_level(logging.INFO, logger="odise_pl")
    caplog.clear()
    resumed, module = run(tmp_path / "b", "trainer.max_steps=4", "model.optimizer.lr=1e-5", ckpt=ckpt)
    schedule = module.trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert sorted(resumed) == [2, 3]
    for step, lrs in resumed.items():
        assert lrs == pytest.approx([1e-5 * schedule(step)] * len(lrs))  # every group, the new rate
    assert "model.optimizer.lr 0.001 -> 1e-05" in caplog.text
    # unchanged settings: nothing to say, the checkpoint's state is kept
    caplog.clear()
    run(tmp_path / "c", "trainer.max_steps=3", "model.optimizer.lr=1e-3", ckpt=ckpt)
    assert "resumed with this run's optimiser settings" not in caplog.text


@pytest.mark.parametrize("option", ["fdr", "limit", "overfit", "anomaly"])
def test_debug_configs_run(tmp_path, option):
    overrides = [f"debug={option}", "data.synthetic.num_train=4", "data.synthetic.num_val=2"]
    if option != "fdr":  # keep the test short: two steps of each mode
        overrides += ["trainer.max_steps=2", "trainer.val_check_interval=2"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out", *overrides]
        )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == (1 if option == "fdr" else 2)
