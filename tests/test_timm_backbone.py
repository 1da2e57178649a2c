"""The Table 3 backbone ablation: frozen timm backbones behind the diffusion backbone's interface."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from odise_pl.model.feature_pyramid import FeaturePyramid
from odise_pl.model.timm_backbone import TimmBackbone
from odise_pl.train import build
from odise_pl.weights import load_timm

from test_train import cfg_for

ROOT = Path(__file__).resolve().parents[1]
DIFFUSION = {"diffusion", "sd15", "sd2", "sdxl"}  # tests/test_backbones.py
BACKBONES = sorted(p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml") if p.stem not in DIFFUSION)


def test_every_table3_backbone_is_configured():
    assert set(BACKBONES) == {"clip_l", "clip_h", "dino_b", "mae_h", "convnext", "swin"}


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_feeds_the_pyramid_and_stays_frozen(tmp_path, name):
    _, module, _ = build(cfg_for(tmp_path, f"backbone={name}"))
    net = module.net
    assert type(net.backbone) is TimmBackbone and type(net.captioner).__name__ == "EmptyCaptioner"
    images = torch.rand(2, 3, 128, 192)
    feats = net.backbone(images, *net.captioner(images))
    info = net.backbone.feature_info()
    assert set(feats) == set(info)
    for key, (channels, _) in info.items():
        assert feats[key].shape[:2] == (2, channels)
    pyramid = net.pyramid(feats, (128, 192))
    assert {k: tuple(v.shape[-2:]) for k, v in pyramid.items()} == {
        "s2": (32, 48),
        "s3": (16, 24),
        "s4": (8, 12),
        "s5": (4, 6),
    }
    # Nothing of the backbone is trained or saved; the trained part gets gradients.
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert not any(k.startswith("backbone.") for k in net.trainable_state_dict())
    out = net(images)
    out["pred_masks"].mean().backward()
    assert net.pyramid.blocks[next(iter(info))].conv1.weight.grad is not None


def test_hierarchical_stages_keep_their_strides():
    backbone = TimmBackbone(load_timm("tiny", "convnext_xlarge.fb_in22k"))
    assert [s for _, s in backbone.feature_info().values()] == [4, 8, 16, 32]
    feats = backbone(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_swin_features_come_channels_first():
    backbone = TimmBackbone(
        load_timm("tiny", "swin_large_patch4_window12_384.ms_in22k", strict_img_size=False)
    )
    feats = backbone(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats.values()] == [
        (16, 16, 24),
        (32, 8, 12),
        (64, 4, 6),
        (128, 2, 3),
    ]


def test_plain_vit_taps_map_to_the_four_levels_and_patch14_inputs_are_resized():
    backbone = TimmBackbone(load_timm("tiny", "vit_large_patch14_clip_336.openai", dynamic_img_size=True))
    assert [s for _, s in backbone.feature_info().values()] == [4, 8, 16, 32]
    feats = backbone(torch.rand(1, 3, 128, 192))  # -> 126 x 196 (multiples of 14) -> 9 x 14 tokens
    assert all(tuple(f.shape[-2:]) == (9, 14) for f in feats.values())
    pyr = FeaturePyramid(feature_info=backbone.feature_info(), out_channels=16)
    assert tuple(pyr(feats, (128, 192))["s2"].shape) == (1, 16, 32, 48)


def test_normalisation_uses_the_models_own_statistics():
    backbone = TimmBackbone(load_timm("tiny", "vit_base_patch16_224.dino", dynamic_img_size=True))
    cfg = backbone.model.pretrained_cfg
    assert torch.allclose(backbone.mean.flatten(), torch.tensor(cfg["mean"]))
    clip = TimmBackbone(load_timm("tiny", "vit_large_patch14_clip_336.openai", dynamic_img_size=True))
    assert torch.allclose(clip.mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))


# slow: a 7-run multirun (~25 s); tests/test_cluster.py covers sweep + table in the default suite,
# the backbones themselves are tested above
@pytest.mark.slow
def test_backbone_ablation_runs_and_collects_one_table(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "odise_pl.train",
        "-m",
        "ablation=backbone",
        "trainer.max_steps=2",
        "data.num_workers=0",
        f"paths.root_dir={tmp_path}",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=2",
        "callbacks.progress.refresh_rate=0",
        "trainer.enable_model_summary=false",
        "logger=none",
        "callbacks.visualize=null",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = next((tmp_path / "multirun" / "train").iterdir())
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "collect_runs.py"), str(sweep)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| backbone=")]
    assert [r.split("|")[1].strip() for r in rows] == [
        f"backbone={b}" for b in ("diffusion", "clip_l", "clip_h", "dino_b", "mae_h", "convnext", "swin")
    ]
    assert all("failed" not in r for r in rows)
