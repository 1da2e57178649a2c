"""Diffusion backbones beyond SD v1: `backbone=sd2`, `backbone=sdxl`, `weights.unet_source=` (issue 24).

Tiny random configurations of the same diffusers / transformers classes train and run inference
here; full-size parameter counts against the published architectures are in the slow suite.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from hydra import compose, initialize_config_dir

from odise_pl import weights as W
from odise_pl.config import CONFIG_DIR
from odise_pl.errors import WeightsNotFoundError
from odise_pl.inference.segment import load_model
from odise_pl.model.diffusion_backbone import DiffusionBackbone, last_block_of_each_level
from odise_pl.model.text_encoder import SDTextEncoder
from odise_pl.train import build, train
from test_readme_commands import FAST

from test_train import cfg_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backbone", ["sd2", "sdxl"])
def test_each_backbone_trains_saves_only_what_is_trained_and_segments(tmp_path, backbone):
    cfg = cfg_for(
        tmp_path,
        f"backbone={backbone}",
        "trainer.max_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    train(cfg)
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved and not any(k.startswith(("net.backbone.", "net.text_encoder.")) for k in saved)
    # the checkpoint describes its backbone: the default config (SD v1) loads it as what it is
    module, _ = load_model(checkpoint=str(ckpt), overrides=["weights.mode=tiny"])
    _, fresh, _ = build(cfg)
    assert (
        module.net.backbone.unet.config.cross_attention_dim
        == fresh.net.backbone.unet.config.cross_attention_dim
    )
    assert (module.net.text_encoder.second is not None) == (backbone == "sdxl")
    trained, initial = module.net.trainable_state_dict(), fresh.net.trainable_state_dict()
    assert set(trained) == set(initial) and any(not torch.equal(trained[k], initial[k]) for k in initial)
    # the implicit captioner writes the backbone's own token width
    assert module.net.captioner.proj.out_features == module.net.text_encoder.hidden_size
    datamodule = build(cfg)[0]
    datamodule.prepare_data()
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        preds = module.make_predictor()(
            batch["images"], batch["meta"], datamodule.vocabulary, datamodule.isthing
        )
    ids, segments = preds[0]["panoptic"]
    assert len(preds) == len(batch["images"]) and tuple(ids.shape) == (
        batch["meta"][0]["height"],
        batch["meta"][0]["width"],
    )
    assert isinstance(segments, list)


def _backbone(arch: str, **kw) -> DiffusionBackbone:
    return DiffusionBackbone(
        unet=W.load_unet("tiny", arch=arch),
        vae=W.load_vae("tiny", arch=arch),
        scheduler=W.load_scheduler("tiny", arch=arch),
        **kw,
    )


def test_taps_are_derived_from_the_unets_structure():
    # SD v1 / 2.x: "every third block" is the official 2, 5, 8, 11
    for arch in ("sd1", "sd2"):
        assert last_block_of_each_level(W.load_unet("meta", arch=arch)) == [2, 5, 8, 11]
        assert set(_backbone(arch, unet_block_indices="auto").feature_info()) == set(
            _backbone(arch).feature_info()
        )
    # SDXL: three levels of three blocks, at 1/32, 1/16 and 1/8 of the image
    assert last_block_of_each_level(W.load_unet("meta", arch="sdxl")) == [2, 5, 8]
    info = _backbone("sdxl", unet_block_indices="auto").feature_info()
    assert {k: v[1] for k, v in info.items() if k.startswith("unet")} == {
        "unet_up_2": 32,
        "unet_up_5": 16,
        "unet_up_8": 8,
    }
    with pytest.raises(ValueError, match="'auto'"):
        _backbone("sd1", unet_block_indices="every_third")


def test_sdxl_is_conditioned_on_the_pooled_text_and_the_window_size():
    torch.manual_seed(0)
    bb = _backbone("sdxl", unet_block_indices="auto")
    images, cond = torch.rand(1, 3, 64, 64), torch.randn(1, 77, 80)
    with pytest.raises(ValueError, match="pooled text embedding.*set_added_text"):
        bb(images, cond)
    bb.set_added_text(torch.zeros(1, 48))
    a = bb(images, cond)["unet_up_8"]
    bb.set_added_text(torch.ones(1, 48))
    b = bb(images, cond)["unet_up_8"]
    assert not torch.allclose(a, b)  # the pooled embedding reaches the UNet
    seen = {}
    bb.unet.add_embedding.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    bb(torch.rand(1, 3, 64, 96), cond)
    # time ids (original size, crop, target size) of the 64 x 96 window, each embedded in 8 channels
    assert seen["x"].shape == (1, 48 + 6 * 8)


def test_text_towers_follow_the_model():
    torch.manual_seed(0)
    v1 = SDTextEncoder(model=W.load_text_encoder("tiny"))
    v2 = SDTextEncoder(model=W.load_text_encoder("tiny", arch="sd2"), pad_token="zero")
    ids1, ids2 = v1.tokenize(["a cat"]), v2.tokenize(["a cat"])
    assert ids1[0, 4:].eq(49407).all() and ids2[0, 4:].eq(0).all()  # v1 pads with end-of-text, 2.x with "!"
    first = SDTextEncoder(model=W.load_text_encoder("tiny", arch="sdxl"), hidden_layer="penultimate")
    second = SDTextEncoder(
        model=W.load_text_encoder("tiny", arch="sdxl", subfolder="text_encoder_2"),
        pad_token="zero",
        hidden_layer="penultimate",
    )
    xl = SDTextEncoder(model=first.model, hidden_layer="penultimate", second=second)
    tokens = xl(["a cat"])
    assert tokens.shape == (1, 77, 32 + 48) and xl.hidden_size == 80 and xl.pooled_size == 48
    # each tower's second-to-last layer, before the final LayerNorm
    ref = first.model(input_ids=first.tokenize(["a cat"]), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(tokens[..., :32], ref)
    torch.testing.assert_close(
        xl.pooled(["a cat"]), second.model(input_ids=second.tokenize(["a cat"])).text_embeds
    )


def test_a_fine_tuned_unet_replaces_the_base_models(tmp_path):
    torch.manual_seed(1)
    tuned = W.load_unet("tiny")
    tuned.save_pretrained(tmp_path / "clean-unet")
    loaded = W.load_unet("pretrained", source="not/the-base-model", unet_source=str(tmp_path / "clean-unet"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tuned.state_dict().values()))
    assert not any(p.requires_grad for p in loaded.parameters())
    # also a pipeline folder's unet/
    (tmp_path / "pipe").mkdir()
    tuned.save_pretrained(tmp_path / "pipe" / "unet")
    assert isinstance(W.load_unet("pretrained", unet_source=str(tmp_path / "pipe")), UNet2DConditionModel)
    # a UNet of another architecture than the backbone's is named as such
    W.load_unet("tiny", arch="sdxl").save_pretrained(tmp_path / "xl")
    with pytest.raises(WeightsNotFoundError, match="is not Stable Diffusion v1.x.*backbone=sdxl"):
        W.load_unet("pretrained", unet_source=str(tmp_path / "xl"))
    with pytest.raises(WeightsNotFoundError, match="cannot load the diffusion UNet.*nowhere"):
        W.load_unet("pretrained", unet_source=str(tmp_path / "nowhere"))


def test_the_diffusion_ablation_sweeps_four_backbones():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["ablation=diffusion"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params.backbone == "diffusion,sd15,sd2,sdxl"
        sources = {
            b: compose("train", overrides=[f"backbone={b}"]).weights.sd_source
            for b in ("diffusion", "sd15", "sd2", "sdxl")
        }
    assert sources == {
        "diffusion": "CompVis/stable-diffusion-v1-3",
        "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "sd2": "stabilityai/stable-diffusion-2-1",
        "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    }


@pytest.mark.slow
def test_the_diffusion_ablation_trains_every_backbone(tmp_path):
    cmd = [sys.executable, "-m", "odise_pl.train", "-m", "ablation=diffusion", "experiment=tiny", *FAST]
    res = subprocess.run([*cmd, f"paths.root_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = next((tmp_path / "multirun" / "train").iterdir())
    assert len([p for p in sweep.iterdir() if (p / "metrics.json").is_file()]) == 4


@pytest.mark.slow
def test_bench_backbones_prints_the_table_and_its_ratios():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_backbones.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| sd")]
    assert [r.split("|")[1].strip() for r in rows] == ["sd13", "sd21", "sdxl"]
    assert (
        len(re.findall(r"vs sd13 at 128\^2: ours [\d.]+ s, baseline [\d.]+ s, ratio [\d.]+", res.stdout)) == 2
    )


@pytest.mark.slow
def test_full_size_architectures_match_the_published_parameter_counts():
    count = lambda m: W.count_parameters(m)  # noqa: E731
    assert round(count(W.load_unet("meta", arch="sd2")) / 1e6, 1) == 865.9  # SD 2.1 UNet
    assert round(count(W.load_unet("meta", arch="sdxl")) / 1e9, 3) == 2.567  # SDXL UNet
    assert round(count(W.load_unet("meta", arch="sd1")) / 1e6, 1) == 859.5  # SD v1 UNet
    assert (
        round(count(W.load_text_encoder("meta", arch="sd2")) / 1e6, 1) == 340.4
    )  # OpenCLIP ViT-H text, 23 layers
    assert (
        round(count(W.load_text_encoder("meta", arch="sdxl", subfolder="text_encoder_2")) / 1e6, 1) == 694.7
    )  # bigG
    assert round(count(W.load_vae("meta", arch="sdxl")) / 1e6, 1) == 83.7


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_missing_weights_of_every_part_are_one_clear_error(tmp_path, arch):
    missing = str(tmp_path / "not-downloaded")
    loaders = [
        lambda: W.load_unet("pretrained", missing, arch=arch),
        lambda: W.load_vae("pretrained", missing, arch=arch),
        lambda: W.load_text_encoder("pretrained", missing, arch=arch),
    ]
    if arch == "sdxl":
        loaders.append(
            lambda: W.load_text_encoder("pretrained", missing, arch=arch, subfolder="text_encoder_2")
        )
    for load in loaders:
        with pytest.raises(
            WeightsNotFoundError, match=r"cannot load the .* from .*not-downloaded[\s\S]*weights\.sd_source="
        ):
            load()
