"""Shared fixtures: tiny frozen models (built once) and the synthetic dataset on disk."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from odise_pl import weights as W  # noqa: E402
from odise_pl.data.synthetic import write_dataset  # noqa: E402
from odise_pl.model.clip import FrozenCLIP  # noqa: E402
from odise_pl.model.diffusion_backbone import DiffusionBackbone  # noqa: E402
from odise_pl.model.text_encoder import SDTextEncoder  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    maps = write_dataset(root, num_train=12, num_val=4, seed=0)
    return root, maps


@pytest.fixture(scope="session")
def tiny_text_encoder():
    torch.manual_seed(0)
    return SDTextEncoder(model=W.load_text_encoder("tiny"))


@pytest.fixture(scope="session")
def tiny_clip():
    torch.manual_seed(0)
    return FrozenCLIP(model=W.load_open_clip("tiny"))


def make_backbone(**kw) -> DiffusionBackbone:
    torch.manual_seed(0)
    return DiffusionBackbone(
        unet=W.load_unet("tiny"), vae=W.load_vae("tiny"), scheduler=W.load_scheduler("tiny"), **kw
    )


@pytest.fixture(scope="session")
def tiny_backbone():
    return make_backbone()


def make_odise(backbone, text_encoder, clip, captioner="implicit", queries=8):
    from odise_pl.model.captioner import EmptyCaptioner, ImplicitCaptioner, TextCaptioner
    from odise_pl.model.feature_pyramid import FeaturePyramid
    from odise_pl.model.mask_classifier import MaskClassifier
    from odise_pl.model.odise import ODISE
    from odise_pl.model.pixel_decoder import MSDeformAttnPixelDecoder
    from odise_pl.model.transformer_decoder import MaskedTransformerDecoder

    cap = {"implicit": ImplicitCaptioner, "empty": EmptyCaptioner, "text": TextCaptioner}[captioner]
    torch.manual_seed(0)
    return ODISE(
        backbone=backbone,
        text_encoder=text_encoder,
        clip=clip,
        captioner=functools.partial(cap),
        pyramid=functools.partial(FeaturePyramid, out_channels=32),
        pixel_decoder=MSDeformAttnPixelDecoder(
            in_channels=32, conv_dim=32, mask_dim=32, num_layers=1, num_heads=4, dim_feedforward=64
        ),
        transformer_decoder=MaskedTransformerDecoder(
            in_channels=32,
            mask_dim=32,
            hidden_dim=32,
            num_queries=queries,
            num_heads=4,
            dim_feedforward=64,
            num_layers=3,
            embed_dim=clip.embed_dim,
        ),
        classifier=functools.partial(MaskClassifier),
        backbone_size=128,
    )


@pytest.fixture()
def tiny_odise(tiny_backbone, tiny_text_encoder, tiny_clip):
    return make_odise(tiny_backbone, tiny_text_encoder, tiny_clip)
