"""Parity with the official ODISE code, on fixtures the authors' own code produced.

``$ODISE_PARITY_DIR`` (default ``../shared/parity`` beside the project) holds one folder per case
(format: its README): the official modules' weights under the official names, inputs and outputs,
and a ``case.json`` with every size and the tolerances. Each test finds the cases of its kind by
``case.json["case"]``, builds our module from the case's parameters (never from the shipped sizes),
converts the weights with our converter, runs the inputs and compares every listed output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from odise_pl.checkpoints.official import convert_state_dict
from odise_pl.inference.open_vocab import (
    class_probabilities,
    ensemble_logits,
    mask_class_scores,
    no_object_probability,
    seen_categories,
)
from odise_pl.inference.postprocess import instance_inference, panoptic_inference, semantic_inference
from odise_pl.model.captioner import ImplicitCaptioner
from odise_pl.model.clip import FrozenCLIP, clip_logits
from odise_pl.model.feature_pyramid import FeaturePyramid
from odise_pl.model.mask_classifier import MaskClassifier
from odise_pl.model.pixel_decoder import MSDeformAttnPixelDecoder
from odise_pl.model.sliding_window import slide, window_boxes
from odise_pl.model.transformer_decoder import MaskedTransformerDecoder

ROOT = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("ODISE_PARITY_DIR", ROOT / ".." / "shared" / "parity"))


def _cases(*kinds: str) -> list:
    """Case folders whose ``case.json["case"]`` is one of ``kinds`` (a skip marker when none)."""
    found = []
    if PARITY.is_dir():
        for d in sorted(p for p in PARITY.iterdir() if (p / "case.json").is_file()):
            if json.loads((d / "case.json").read_text())["case"] in kinds:
                found.append(pytest.param(d, id=d.name))
    return found or [
        pytest.param(None, marks=pytest.mark.skip(reason=f"no {'/'.join(kinds)} case in {PARITY}"))
    ]


def load_case(d: Path) -> tuple[dict, dict, dict, dict]:
    case = json.loads((d / "case.json").read_text())
    weights = load_file(d / "weights.safetensors") if (d / "weights.safetensors").exists() else {}
    return case, weights, load_file(d / "inputs.safetensors"), load_file(d / "outputs.safetensors")


def assert_close(x: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    """``max|x - ref| <= rel * max|ref|``, computed in float64 (the fixtures' metric)."""
    assert tuple(x.shape) == tuple(ref.shape), f"{what}: shape {tuple(x.shape)} vs {tuple(ref.shape)}"
    err = (x.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def grouped(flat: torch.Tensor, group_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows flattened category by category -> (K, S, D) padded, valid (K, S)."""
    sizes = group_sizes.tolist()
    out = flat.new_zeros(len(sizes), max(sizes), flat.shape[-1])
    valid = torch.zeros(len(sizes), max(sizes), dtype=torch.bool)
    start = 0
    for k, n in enumerate(sizes):
        out[k, :n], valid[k, :n] = flat[start : start + n], True
        start += n
    return out, valid


def converted(container: nn.Module, weights: dict, feature_order: list[str] | None = None) -> nn.Module:
    """Load the official weights into ``container`` through our converter, strictly."""
    state, report = convert_state_dict(weights, container.state_dict(), feature_order or [])
    assert not report["unmapped"], report["unmapped"]
    container.load_state_dict(state, strict=True)
    return container.eval()


# -- mask generator: pixel decoder, transformer decoder, mask-embedding head, text head -----------------
def build_mask_generator(hp: dict) -> nn.Module:
    pd, td, head = hp["pixel_decoder"], hp["transformer_decoder"], hp["text_head"]
    caption = hp["kind"] == "caption"
    m = nn.Module()
    m.pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels=hp["pyramid_channels"],
        conv_dim=pd["conv_dim"],
        mask_dim=pd["mask_dim"],
        num_layers=pd["transformer_enc_layers"],
        num_heads=pd["transformer_nheads"],
        num_points=pd["enc_n_points"],
        dim_feedforward=pd["transformer_dim_feedforward"],
    )
    m.transformer_decoder = MaskedTransformerDecoder(
        in_channels=td["in_channels"],
        mask_dim=td["mask_dim"],
        hidden_dim=td["hidden_dim"],
        num_queries=td["num_queries"],
        num_heads=td["nheads"],
        dim_feedforward=td["dim_feedforward"],
        num_layers=td["dec_layers"],
        embed_dim=hp["post_mask_embed"]["projection_dim"],
        objectness=caption,
    )
    m.classifier = MaskClassifier(
        text_dim=head["clip_dim"],
        embed_dim=head["projection_dim"],
        null_init=torch.zeros(head["clip_dim"]) if head.get("null_embed") else None,
    )
    return m


def run_decoder(m: nn.Module, multi_scale: list, mask_features: torch.Tensor, inputs: dict) -> dict:
    """Every prediction set (stacked, index 0 = the learnable queries) and the heads' outputs."""
    captured = {}
    hook = m.transformer_decoder.embed_head.register_forward_pre_hook(lambda _m, a: captured.update(x=a[0]))
    with torch.no_grad():
        out = m.transformer_decoder(multi_scale, mask_features, aux=True)
    hook.remove()
    sets = [*out["aux_outputs"], out]
    text, valid = grouped(inputs["text_embed"].to(mask_features.dtype), inputs["label_group_sizes"])
    b, n = mask_features.shape[0], len(sets)
    pooled = captured["x"]  # the head's input: pool_proj(pooled features) + decoder output, all sets
    res = {
        "pred_masks": torch.stack([s["pred_masks"] for s in sets]),
        "mask_embed": torch.stack([s["mask_embed"] for s in sets]),
        "mask_pooled_features": pooled.view(b, n, -1, pooled.shape[-1]).transpose(0, 1),
        "logits": torch.stack([m.classifier(s["mask_embed"], text, valid) for s in sets]),
    }
    if "pred_objectness" in out:
        res["objectness_logits"] = torch.stack([s["pred_objectness"] for s in sets])
    return res


@pytest.mark.parametrize("case_dir", _cases("mask_generator_label", "mask_generator_caption"))
def test_mask_generator(case_dir):
    case, weights, inputs, outputs = load_case(case_dir)
    hp, tol = case["hyperparameters"], case["tolerance"]
    m = converted(build_mask_generator(hp), weights)
    levels = [f"s{i}" for i in (2, 3, 4, 5)]

    # stage 1: the pixel decoder in float32, as the official one runs
    pixel = m.pixel_decoder.float()
    with torch.no_grad():
        mask_features, multi_scale = pixel({k: inputs[k].float() for k in levels})
    rel = tol["pixel_decoder_float32"]
    assert_close(mask_features, outputs["mask_features"], rel, "mask_features")
    for i, x in enumerate(multi_scale):
        assert_close(x, outputs[f"multi_scale_features.{i}"], rel, f"multi_scale_features.{i}")

    # stage 2: decoder and heads in float64, fed the official pixel-decoder outputs
    m.transformer_decoder.double()
    m.classifier.double()
    official_ms = [outputs[f"multi_scale_features.{i}"].double() for i in range(len(multi_scale))]
    got = run_decoder(m, official_ms, outputs["mask_features"].double(), inputs)
    rel = tol["decoder_and_heads_float64_fed_official_pixel_decoder_outputs"]
    logits_name = "open_logits" if hp["kind"] == "caption" else "class_logits"
    for name, ref_name in [
        ("pred_masks", "pred_masks"),
        ("mask_embed", "mask_embed"),
        ("mask_pooled_features", "mask_pooled_features"),
        ("logits", logits_name),
        *([("objectness_logits", "objectness_logits")] if "objectness_logits" in outputs else []),
    ]:
        assert_close(got[name], outputs[ref_name], rel, name)
    with torch.no_grad():
        assert_close(
            m.classifier.text_proj(inputs["text_embed"].double()),
            outputs["projected_text_embed"],
            rel,
            "text_proj",
        )
        if "projected_null_embed" in outputs:
            assert_close(
                m.classifier.text_proj(m.classifier.null_embed), outputs["projected_null_embed"], rel, "null"
            )
    assert_close(m.classifier.scale.detach(), outputs["logit_scale"], rel, "logit_scale")

    # end to end in float32
    m.float()
    got = run_decoder(m, [x.float() for x in multi_scale], mask_features, inputs)
    rel = tol["end_to_end_float32"]
    assert_close(got["pred_masks"], outputs["pred_masks"], rel, "pred_masks (float32)")
    assert_close(got["logits"], outputs[logits_name], rel, "logits (float32)")


# -- feature pyramid and sliding window ----------------------------------------------------------------
def build_pyramid(hp: dict) -> tuple[nn.Module, list[str]]:
    taps = sorted(hp["taps"].items(), key=lambda kv: kv[1]["official_index"])
    info = {name: (t["in_channels"], t["nominal_stride"]) for name, t in taps}
    m = nn.Module()
    m.pyramid = FeaturePyramid(
        feature_info=info,
        out_channels=hp["projection_dim"],
        bottleneck_ratio=4,  # hp["block"]: bottleneck = projection_dim // 4 (detectron2 ResNet)
    )
    return m, [name for name, _ in taps]


@pytest.mark.parametrize("case_dir", _cases("pyramid"))
def test_pyramid(case_dir):
    case, weights, inputs, outputs = load_case(case_dir)
    m, order = build_pyramid(case["hyperparameters"])
    pyramid = converted(m, weights, order).pyramid.double()
    for name, tap in case["hyperparameters"]["taps"].items():  # identity shortcut where widths agree
        identity = tap["in_channels"] == case["hyperparameters"]["projection_dim"]
        assert (pyramid.blocks[name].shortcut is None) == identity, name
    with torch.no_grad():
        got = pyramid({k: inputs[k].double() for k in order}, tuple(case["call"]["input_image_size"]))
    for name, x in got.items():
        assert_close(x, outputs[name], case["tolerance"]["float64"], name)


@pytest.mark.parametrize("case_dir", _cases("pyramid_slide"))
def test_sliding_window_pyramid(case_dir):
    case, weights, inputs, outputs = load_case(case_dir)
    hp = case["hyperparameters"]
    m, order = build_pyramid(hp)
    pyramid = converted(m, weights, order).pyramid.double()
    h, w = hp["image_size"]
    size = hp["backbone_in_size"][0]
    assert window_boxes(h, w, min(size, h, w)) == [tuple(b) for b in inputs["window_boxes"].tolist()]

    consumed = []

    def stub(windows: torch.Tensor, window_size):
        # the official extractor is a stub returning the fixture's taps of the next windows
        assert windows.shape[-2:] == (size, size)
        n = windows.shape[0] // hp["batch"]
        first = len(consumed)
        consumed.extend(range(first, first + n))
        taps = {k: torch.cat([inputs[k][i] for i in range(first, first + n)]).double() for k in order}
        return pyramid(taps, window_size)

    images = torch.zeros(hp["batch"], 3, h, w, dtype=torch.float64)
    with torch.no_grad():
        got, counts = slide(images, size, stub, pyramid.strides)
    assert consumed == list(range(len(inputs["window_boxes"])))
    for name, x in got.items():
        assert_close(x, outputs[name], case["tolerance"]["float64"], name)
        assert torch.equal(counts[name], outputs[f"window_count.{name}"])
    # one window at a time computes the same
    consumed.clear()
    with torch.no_grad():
        one, _ = slide(images, size, stub, pyramid.strides, windows_per_pass=1)
    for name, x in one.items():
        assert_close(x, got[name], 1e-12, f"{name} one window per pass")


# -- implicit captioner ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case_dir", _cases("captioner"))
def test_implicit_captioner(case_dir):
    case, weights, inputs, outputs = load_case(case_dir)
    hp = case["hyperparameters"]
    uncond = inputs["uncond_inputs"].double()
    # stand-ins for the frozen text encoder (the empty caption's embedding) and CLIP (its width)
    learnable_time = hp.get("learnable_time_embed", True)
    captioner = ImplicitCaptioner(
        text_encoder=lambda texts: uncond,
        clip=SimpleNamespace(embed_dim=hp["clip_dim"]),
        time_embed_dim=hp["time_embed_dim"] if learnable_time else 0,
        num_timesteps=hp["num_timesteps"],
    )
    m = nn.Module()
    m.captioner = captioner
    converted(m, weights).double()
    with torch.no_grad():
        cond, offset = captioner.embed(inputs["clip_image_embed"].double())
        prefix = captioner.proj(inputs["clip_image_embed"].double())[:, None] + captioner.pos_embed
    rel = case["tolerance"]["float64"]
    assert_close(cond, outputs["cond_inputs"], rel, "cond_inputs")
    if learnable_time:
        assert_close(offset, outputs["cond_emb"], rel, "cond_emb")
    else:
        assert offset is None
    assert_close(prefix, outputs["prefix_embed"], rel, "prefix_embed")


# -- frozen backbone taps -----------------------------------------------------------------------------
@pytest.mark.parametrize("case_dir", _cases("backbone_taps"))
def test_backbone_taps(case_dir):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from odise_pl import weights as W
    from odise_pl.model.diffusion_backbone import DiffusionBackbone

    case, weights, inputs, outputs = load_case(case_dir)
    hp, tol = case["hyperparameters"], case["tolerance"]
    if len(hp["steps"]) != 1:
        pytest.skip(
            "several diffusion steps: the official extractor returns per-step taps, ours concatenates them"
        )
    unet = UNet2DConditionModel(**hp["diffusers_unet_config"])
    vae = AutoencoderKL(**hp["diffusers_vae_config"])
    unet.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("unet.")}, strict=True)
    vae.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("vae.")}, strict=True)
    backbone = DiffusionBackbone(
        unet=unet.float(),
        vae=vae.float(),
        scheduler=DDPMScheduler(**W.SD_V1_SCHEDULER),  # SD v1's = the official ldm_linear schedule
        unet_block_indices=hp["unet_block_indices"],
        vae_encoder_block_indices=hp["encoder_block_indices"],
        vae_decoder_block_indices=hp["decoder_block_indices"],
        timesteps=hp["steps"],
        noise_seed=hp["noise_seed"],
        noise_size=hp["noise_drawn_at"][-2:],
    )
    assert backbone.feature_info() == {
        name: (hp["tap_channels"][name], hp["tap_strides"][name]) for name in hp["tap_channels"]
    }
    assert list(backbone.feature_info()) == list(hp["tap_channels"])  # the official feature order
    image = inputs["image"].float()
    with torch.no_grad():
        taps = backbone(image, inputs["cond_inputs"].float(), inputs["cond_emb"].float())
        latent = backbone.encode(image)
        noise = backbone.noise(latent.shape, latent.device, torch.float32)
        noisy = backbone.noisy_latents(latent, hp["steps"][0])
    for name, x in taps.items():
        assert_close(x, outputs[name], tol["vae_taps"] if name.startswith("vae") else tol["unet_taps"], name)
    assert_close(backbone.alphas_cumprod, outputs["alphas_cumprod"], 1e-12, "alphas_cumprod")
    assert_close(backbone.shared_noise(), outputs["shared_noise"], tol["latent_noise"], "shared_noise")
    assert_close(noise, outputs["noise"], tol["latent_noise"], "noise")
    # The latent goes through diffusers' VAE, not the LDM one: the case itself measured the two
    # layouts' posterior means 1.4e-6 apart, so the latents get that margin on top of latent_noise.
    layouts = case["checks"]["diffusers_layout"]["vae_posterior_mean_max_rel_diff"]
    rel = tol["latent_noise"] + 2 * layouts
    assert_close(latent, outputs["latent"], rel, "latent")
    assert_close(noisy, outputs["noisy_latent"], rel, "noisy_latent")


# -- MaskCLIP ---------------------------------------------------------------------------------------------
def build_clip(hp: dict, weights: dict) -> FrozenCLIP:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=hp["layers"],
        width=hp["width"],
        head_width=hp["head_width"],
        patch_size=hp["patch_size"],
        image_size=hp["image_size"],
        mlp_ratio=hp["mlp_ratio"],
    )
    # The case holds the image tower only; a small text tower completes the model (unused here).
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    model = CLIP(embed_dim=hp["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=True)
    result = model.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    assert all(
        k.startswith(
            (
                "transformer.",
                "token_embedding",
                "ln_final",
                "text_projection",
                "positional_embedding",
                "attn_mask",
            )
        )
        for k in result.missing_keys
    )
    return FrozenCLIP(model=model.double())


@pytest.mark.parametrize("case_dir", _cases("maskclip"))
def test_maskclip(case_dir):
    case, weights, inputs, outputs = load_case(case_dir)
    tol = case["tolerance"]
    clip = build_clip(case["hyperparameters"]["clip"], weights)
    image, masks = inputs["image"].double(), inputs["mask_logits"].double()
    visible = clip.mask_visibility(masks)
    assert torch.equal(visible, outputs["mask_token_attends_patch"])
    embed = clip.mask_embeddings(image, masks)
    assert_close(embed, outputs["mask_embed"], tol["float64"], "mask_embed")
    text, valid = grouped(inputs["text_embed"].double(), inputs["label_group_sizes"])
    assert_close(clip.logit_scale, outputs["logit_scale"], tol["float64"], "logit_scale")
    logits = clip_logits(embed, text, valid, clip.logit_scale)
    assert_close(logits, outputs["mask_pred_open_logits"], tol["float64"], "mask_pred_open_logits")
    raw = clip.encode_image(image).float()  # the official code casts it to float32
    assert_close(raw, outputs["clip_image_embed"], tol["clip_image_embed"], "clip_image_embed")
    # Batched over masks: one mask alone gets the same embedding (its token sees no other mask token).
    alone = clip.mask_embeddings(image[:1], masks[:1, 3:4])
    assert_close(alone, embed[:1, 3:4], 1e-12, "one mask alone")


# -- open-vocabulary inference after the network --------------------------------------------------------
@pytest.mark.parametrize("case_dir", _cases("open_vocab_inference_label", "open_vocab_inference_caption"))
def test_open_vocab_inference(case_dir):
    case, weights, inputs, outputs = load_case(case_dir)
    hp, call = case["hyperparameters"], case["call"]
    rel = case["tolerance"]["float64"]
    caption = hp["kind"] == "caption"
    scale = weights["logit_scale"].double().exp().clamp(max=hp["clip_logit_scale_max"])

    seen = seen_categories(call["test_labels"], call["train_labels"])
    assert torch.equal(seen.long(), outputs["seen_mask"])
    text, valid = grouped(inputs["clip_text_embed"].double(), inputs["label_group_sizes"])
    clip = clip_logits(inputs["clip_mask_embed"].double(), text, valid, scale)
    assert_close(clip, outputs["clip_logits"], rel, "clip_logits")

    if caption:
        diff, objectness = inputs["diffusion_open_logits"].double(), inputs["objectness_logits"].double()
        categories = diff
    else:
        diff, objectness = inputs["diffusion_logits"].double(), None
        categories = diff[..., :-1]
    ensembled = ensemble_logits(categories, clip, seen, hp["alpha"], hp["beta"])
    assert_close(ensembled, outputs["ensembled_open_logits"], rel, "ensembled_open_logits")
    scores = mask_class_scores(ensembled, no_object_probability(diff, objectness))
    assert_close(scores, outputs["mask_cls_results"], rel, "mask_cls_results")
    probs = class_probabilities(
        diff, clip, seen, mode="ensemble", alpha=hp["alpha"], beta=hp["beta"], objectness_logits=objectness
    )
    assert_close(probs, outputs["class_probs"], rel, "class_probs")

    isthing = [k in call["thing_categories"] for k in range(len(call["test_labels"]))]
    masks = F.interpolate(
        inputs["mask_logits"].double(), size=tuple(call["padded_size"]), mode="bilinear", align_corners=False
    )
    for i, ((h, w), out_size) in enumerate(zip(call["image_sizes"], call["output_sizes"])):
        full = F.interpolate(
            masks[i : i + 1, :, :h, :w], size=tuple(out_size), mode="bilinear", align_corners=False
        )[0]
        ids, segments = panoptic_inference(
            probs[i], full, isthing, hp["object_mask_threshold"], hp["overlap_threshold"]
        )
        assert torch.equal(ids, outputs[f"panoptic_seg.{i}"]), f"image {i}: panoptic map"
        rows = [[s["id"], s["category_id"], int(s["isthing"])] for s in segments]
        assert rows == outputs[f"segments_info.{i}"].tolist(), f"image {i}: segments_info"
        assert_close(semantic_inference(probs[i], full), outputs[f"sem_seg.{i}"], rel, f"sem_seg.{i}")
        inst = instance_inference(probs[i], full, isthing, hp["test_topk_per_image"])
        order = sorted(
            range(len(inst["query"])), key=lambda j: (int(inst["query"][j]), int(inst["labels"][j]))
        )
        order = torch.tensor(order, dtype=torch.long)
        assert torch.equal(inst["query"][order], outputs[f"instances.{i}.query_index"]), (
            f"image {i}: instances"
        )
        assert torch.equal(inst["labels"][order], outputs[f"instances.{i}.pred_classes"])
        assert torch.equal(inst["masks"][order], outputs[f"instances.{i}.pred_masks"])
        assert_close(inst["scores"][order], outputs[f"instances.{i}.scores"], rel, f"instances.{i}.scores")
