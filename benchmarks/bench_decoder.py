"""Mask decoder + matcher + criterion training step: ours vs Hugging Face transformers' Mask2Former.

Same sizes on both sides (the official ones): features of 512 channels at strides 4..32 of a
``--size`` image, pixel decoder (6 deformable layers, 8 heads, FFN 1024, 256 channels), transformer
decoder (100 queries, hidden 256, 9 layers, FFN 2048), 133 classes, Hungarian matching and the
point-sampled mask loss with 12544 points, deep supervision; forward + backward on CPU.
The transformers model gets the features through a stand-in for its backbone, so only the parts
being compared run. Prints ``name: ours X, baseline Y, ratio Z`` (ratio = ours / baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn

from odise_pl.loss.criterion import SetCriterion
from odise_pl.loss.matcher import HungarianMatcher
from odise_pl.model.mask_classifier import MaskClassifier
from odise_pl.model.pixel_decoder import MSDeformAttnPixelDecoder
from odise_pl.model.transformer_decoder import MaskedTransformerDecoder

NUM_CLASSES, IN_CH, EMBED, TEXT = 133, 512, 256, 768  # official: mask embeddings of mask_dim, CLIP text 768


def make_inputs(batch: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = {
        f"s{k}": torch.randn(batch, IN_CH, size // 2**k, size // 2**k, generator=g) for k in (2, 3, 4, 5)
    }
    targets = []
    for _ in range(batch):
        n = 12
        masks = torch.zeros(n, size, size)
        for i in range(n):  # rectangles of varied size
            y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            h, w = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
            masks[i, y0 : y0 + h, x0 : x0 + w] = 1
        targets.append({"masks": masks, "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g)})
    return feats, targets


class Ours(nn.Module):
    def __init__(self):
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels=IN_CH,
            conv_dim=256,
            mask_dim=256,
            num_layers=6,
            num_heads=8,
            num_points=4,
            dim_feedforward=1024,
            # like for like: transformers' pixel decoder follows autocast, so ours does here too (the
            # model's default keeps Mask2Former's fp32 pixel decoder under autocast)
            full_precision=False,
        )
        self.transformer_decoder = MaskedTransformerDecoder(
            in_channels=256, mask_dim=256, hidden_dim=256, num_queries=100, num_heads=8, dim_feedforward=2048,
            num_layers=9, embed_dim=EMBED,
        )  # fmt: skip
        self.classifier = MaskClassifier(text_dim=TEXT, embed_dim=EMBED)
        self.criterion = SetCriterion(matcher=HungarianMatcher())
        text = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, 1, TEXT), dim=-1)
        self.register_buffer("text", text)
        self.register_buffer("valid", torch.ones(NUM_CLASSES, 1, dtype=torch.bool))

    def step(self, feats, targets) -> torch.Tensor:
        mask_features, multi_scale = self.pixel_decoder(feats)
        out = self.transformer_decoder(multi_scale, mask_features)
        for o in [out, *out["aux_outputs"]]:
            o["pred_logits"] = self.classifier(o["mask_embed"], self.text, self.valid)
        return sum(self.criterion(out, targets).values())


class _FeatureStandIn(nn.Module):
    """Replaces the transformers model's backbone: returns the given features."""

    def __init__(self):
        super().__init__()
        self.channels = [IN_CH] * 4
        self.features = None

    def forward(self, pixel_values):
        from transformers.utils import ModelOutput

        return ModelOutput(feature_maps=tuple(self.features[k] for k in ("s2", "s3", "s4", "s5")))


def build_hf():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    cfg = Mask2FormerConfig(
        backbone_config=SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]),
        num_labels=NUM_CLASSES, hidden_dim=256, num_queries=100, decoder_layers=10, encoder_layers=6,
        dim_feedforward=2048, encoder_feedforward_dim=1024, train_num_points=12544, oversample_ratio=3.0,
        importance_sample_ratio=0.75, use_auxiliary_loss=True,
    )  # fmt: skip
    model = Mask2FormerForUniversalSegmentation(cfg)
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

    standin = _FeatureStandIn()
    model.model.pixel_level_module.encoder = standin
    model.model.pixel_level_module.decoder = Mask2FormerPixelDecoder(cfg, feature_channels=standin.channels)
    model.train()
    return model, standin


def hf_step(model, standin, feats, targets) -> torch.Tensor:
    standin.features = feats
    b, _, h4, w4 = feats["s2"].shape
    out = model(
        pixel_values=torch.zeros(b, 3, h4 * 4, w4 * 4),
        mask_labels=[t["masks"] for t in targets],
        class_labels=[t["labels"] for t in targets],
    )
    return out.loss


def timed_pair(fa, fb, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` times of two steps, run alternately so that load from elsewhere on a
    shared machine hits both alike."""
    fa(), fb()  # warm-up (allocations, first-call paths)
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, fn in enumerate((fa, fb)):
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best[0], best[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side the features come from")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument(
        "--tiny",
        action="store_true",
        help="seconds-long smoke run (what the test suite runs): small sizes, one repeat",
    )
    a = p.parse_args(argv)
    if a.tiny:
        a.size, a.batch, a.repeats, a.precision = 64, 1, 1, ["fp32"]
    torch.manual_seed(0)
    feats, targets = make_inputs(a.batch, a.size)
    ours = Ours().train()
    hf, standin = build_hf()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if "pixel_level_module.encoder" not in n)
    print(
        f"parameters: ours {n_ours / 1e6:.2f}M (incl. the mask-embedding head), transformers {n_hf / 1e6:.2f}M"
    )

    def run_ours():
        ours.zero_grad(set_to_none=True)
        ours.step(feats, targets).backward()

    def run_hf():
        hf.zero_grad(set_to_none=True)
        hf_step(hf, standin, feats, targets).backward()

    results = {}
    for precision in a.precision:
        # bf16: both sides under the same CPU autocast (matmuls in bf16: AVX512-BF16 / AMX where present).
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            t_ours, t_hf = timed_pair(run_ours, run_hf, a.repeats)
        name = f"decoder+matcher+criterion step {precision} (B={a.batch}, {a.size}^2, fwd+bwd, CPU)"
        print(f"{name}: ours {t_ours:.2f} s, baseline {t_hf:.2f} s, ratio {t_ours / t_hf:.2f}", flush=True)
        results[precision] = {"ours": t_ours, "baseline": t_hf}
    return results


if __name__ == "__main__":
    main()
