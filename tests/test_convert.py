"""Converting the authors' checkpoints: a state dict with their key names and shapes (written here
from their public code: NVlabs/ODISE feature_extractor.py / ldm.py / odise.py and Mask2Former's
pixel and transformer decoders) maps one to one onto our trainable parameters."""

import sys

import pytest
import torch
from safetensors.torch import save_file

from odise_pl.checkpoint import CheckpointError, load_trainable
from odise_pl.convert import convert_state_dict, read_their_checkpoint, their_feature_order
from odise_pl.train import build

from test_train import cfg_for

TAPS = their_feature_order([2, 5, 8, 11], [5, 7], [2, 5])


def their_state_dict(d: dict, caption: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Their names, their shapes, random values. ``d``: the architecture's sizes."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(name, *shape):
        sd[name] = torch.randn(*shape, generator=g)

    fe = "backbone.feature_extractor."
    put(fe + "clip_project.linear.weight", d["text_width"], d["clip_dim"])
    put(fe + "clip_project.linear.bias", d["text_width"])
    put(fe + "clip_project.positional_embedding", 1, 77, d["text_width"])
    put(fe + "alpha_cond", 1, 77, d["text_width"])
    put(fe + "time_embed_project.linear.weight", d["time_dim"], d["clip_dim"])
    put(fe + "time_embed_project.linear.bias", d["time_dim"])
    put(fe + "time_embed_project.positional_embedding", 1, 1, d["time_dim"])
    put(fe + "alpha_cond_time_embed", d["time_dim"])
    # frozen parts stored in their file
    put(fe + "ldm_extractor.ldm.ldm.model.diffusion_model.out.2.weight", 4, 320, 3, 3)
    put(fe + "ldm_extractor.shared_noise", 1, 4, 64, 64)
    put(fe + "clip.clip.visual.proj", 1024, 768)
    p, b = d["pyramid"], d["pyramid"] // 4
    for i, c in enumerate(d["tap_channels"]):  # detectron2 BottleneckBlock, norm="GN"
        pre = f"backbone.feature_projections.{i}.0."
        for conv, shape in (
            ("conv1", (b, c, 1, 1)),
            ("conv2", (b, b, 3, 3)),
            ("conv3", (p, b, 1, 1)),
            ("shortcut", (p, c, 1, 1)),
        ):
            put(pre + conv + ".weight", *shape)
            put(pre + conv + ".norm.weight", shape[0])
            put(pre + conv + ".norm.bias", shape[0])
    c, L, H, P = d["conv_dim"], 3, d["pix_heads"], 4
    pd = "sem_seg_head.pixel_decoder."
    for lvl in range(L):
        put(pd + f"input_proj.{lvl}.0.weight", c, p, 1, 1)
        put(pd + f"input_proj.{lvl}.0.bias", c)
        put(pd + f"input_proj.{lvl}.1.weight", c)
        put(pd + f"input_proj.{lvl}.1.bias", c)
    put(pd + "transformer.level_embed", L, c)
    for i in range(d["pix_layers"]):
        pre = pd + f"transformer.encoder.layers.{i}."
        for name, out_dim in (
            ("sampling_offsets", H * L * P * 2),
            ("attention_weights", H * L * P),
            ("value_proj", c),
            ("output_proj", c),
        ):
            put(pre + f"self_attn.{name}.weight", out_dim, c)
            put(pre + f"self_attn.{name}.bias", out_dim)
        put(pre + "linear1.weight", d["pix_ffn"], c)
        put(pre + "linear1.bias", d["pix_ffn"])
        put(pre + "linear2.weight", c, d["pix_ffn"])
        put(pre + "linear2.bias", c)
        for n in ("norm1", "norm2"):
            put(pre + f"{n}.weight", c)
            put(pre + f"{n}.bias", c)
    put(pd + "mask_features.weight", d["mask_dim"], c, 1, 1)
    put(pd + "mask_features.bias", d["mask_dim"])
    put(pd + "adapter_1.weight", c, p, 1, 1)
    put(pd + "adapter_1.norm.weight", c)
    put(pd + "adapter_1.norm.bias", c)
    put(pd + "layer_1.weight", c, c, 3, 3)
    put(pd + "layer_1.norm.weight", c)
    put(pd + "layer_1.norm.bias", c)
    h, pr = d["hidden"], "sem_seg_head.predictor."
    put(pr + "query_feat.weight", d["queries"], h)
    put(pr + "query_embed.weight", d["queries"], h)
    put(pr + "level_embed.weight", L, h)
    for i in range(d["dec_layers"]):
        for layer, attn in (
            ("transformer_self_attention_layers", "self_attn"),
            ("transformer_cross_attention_layers", "multihead_attn"),
        ):
            pre = pr + f"{layer}.{i}."
            put(pre + f"{attn}.in_proj_weight", 3 * h, h)
            put(pre + f"{attn}.in_proj_bias", 3 * h)
            put(pre + f"{attn}.out_proj.weight", h, h)
            put(pre + f"{attn}.out_proj.bias", h)
            put(pre + "norm.weight", h)
            put(pre + "norm.bias", h)
        pre = pr + f"transformer_ffn_layers.{i}."
        put(pre + "linear1.weight", d["dec_ffn"], h)
        put(pre + "linear1.bias", d["dec_ffn"])
        put(pre + "linear2.weight", h, d["dec_ffn"])
        put(pre + "linear2.bias", h)
        put(pre + "norm.weight", h)
        put(pre + "norm.bias", h)
    put(pr + "decoder_norm.weight", h)
    put(pr + "decoder_norm.bias", h)
    for k, (o, i) in enumerate(((h, h), (h, h), (d["mask_dim"], h))):
        put(pr + f"mask_embed.layers.{k}.weight", o, i)
        put(pr + f"mask_embed.layers.{k}.bias", o)
    pm = pr + "post_mask_embed."
    put(pm + "pool_proj.0.weight", h)
    put(pm + "pool_proj.0.bias", h)
    put(pm + "pool_proj.1.weight", h, h)
    put(pm + "pool_proj.1.bias", h)
    put(pm + "mask_embed.0.weight", d["mask_dim"])
    put(pm + "mask_embed.0.bias", d["mask_dim"])
    for k, (o, i) in enumerate(((h, d["mask_dim"]), (h, h), (d["embed"], h))):
        put(pm + f"mask_embed.1.layers.{k}.weight", o, i)
        put(pm + f"mask_embed.1.layers.{k}.bias", o)
    sd[pm + "logit_scale"] = torch.tensor(2.5)
    if caption:
        put(pr + "class_embed.weight", 2, h)
        put(pr + "class_embed.bias", 2)
        put("word_head.clip.clip.token_embedding.weight", 49408, 768)
    else:
        put("category_head.null_embed", 1, d["embed"])
        put("category_head.text_embed", 133, d["embed"])  # buffer of cached text embeddings
        put("category_head.clip.clip.visual.proj", 1024, 768)
    return sd


FULL = dict(
    text_width=768, clip_dim=768, time_dim=1280, pyramid=512,
    # Input widths of the tapped blocks, worked out from SD v1 (VAE 128/256/512/512, UNet 320/640/1280/1280
    # with skip concatenation): VAE enc 5, 7; UNet out 2, 5, 8, 11; VAE dec 2, 5.
    tap_channels=[512, 512, 2560, 1920, 960, 640, 512, 512],
    conv_dim=256, pix_heads=8, pix_layers=6, pix_ffn=1024, mask_dim=256,
    hidden=256, queries=100, dec_layers=9, dec_ffn=2048, embed=768,
)  # fmt: skip


def tiny_dims(net) -> dict:
    info = net.backbone.feature_info()
    return dict(
        text_width=net.captioner.proj.out_features, clip_dim=net.captioner.proj.in_features,
        time_dim=net.captioner.time_proj.out_features, pyramid=net.pyramid.out_channels,
        tap_channels=[info[n][0] for n in TAPS], conv_dim=64, pix_heads=4, pix_layers=2, pix_ffn=128,
        mask_dim=64, hidden=64, queries=16, dec_layers=3, dec_ffn=128, embed=32,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory):
    _, module, _ = build(cfg_for(tmp_path_factory.mktemp("conv"), "model.supervision=label"))
    return module.net


def test_label_model_maps_one_to_one(tiny_net, tmp_path):
    ours = tiny_net.trainable_state_dict()
    theirs = their_state_dict(tiny_dims(tiny_net))
    converted, report = convert_state_dict(theirs, ours, TAPS)
    assert report["unmapped"] == [] and report["no_counterpart"] == [] and report["missing"] == []
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.items()}
    assert len(report["skipped_frozen"]) == 5
    # Spot checks against their names, worked out by hand.
    t = "sem_seg_head.predictor."
    assert torch.equal(
        converted["transformer_decoder.cross_attn.2.attn.in_proj_weight"],
        theirs[t + "transformer_cross_attention_layers.2.multihead_attn.in_proj_weight"],
    )
    assert torch.equal(
        converted["pyramid.blocks.unet_up_2.conv1.weight"],
        theirs["backbone.feature_projections.2.0.conv1.weight"],
    )
    assert torch.equal(
        converted["pyramid.blocks.vae_dec_5.shortcut.1.bias"],
        theirs["backbone.feature_projections.7.0.shortcut.norm.bias"],
    )
    assert torch.equal(
        converted["pixel_decoder.output.1.weight"], theirs["sem_seg_head.pixel_decoder.layer_1.norm.weight"]
    )
    assert torch.equal(converted["classifier.null_embed"], theirs["category_head.null_embed"][0])
    fe = "backbone.feature_extractor."
    assert torch.equal(converted["captioner.pos_embed"], theirs[fe + "clip_project.positional_embedding"][0])
    assert torch.allclose(
        converted["captioner.time_proj.bias"],
        theirs[fe + "time_embed_project.linear.bias"]
        + theirs[fe + "time_embed_project.positional_embedding"][0, 0],
    )
    # The folded bias computes their time offset exactly.
    e = torch.randn(3, tiny_dims(tiny_net)["clip_dim"])
    lin = (
        e @ theirs[fe + "time_embed_project.linear.weight"].T + theirs[fe + "time_embed_project.linear.bias"]
    )
    official = (lin[:, None] + theirs[fe + "time_embed_project.positional_embedding"])[:, 0]
    ours_out = e @ converted["captioner.time_proj.weight"].T + converted["captioner.time_proj.bias"]
    assert torch.allclose(official, ours_out, atol=1e-5)
    # It loads and runs.
    path = tmp_path / "converted.safetensors"
    save_file(converted, str(path))
    load_trainable(tiny_net, path)
    assert torch.equal(tiny_net.classifier.logit_scale, torch.tensor(2.5))
    with torch.no_grad():
        out = tiny_net(torch.rand(1, 3, 128, 128))
    assert out["pred_masks"].shape[1] == 16


def test_caption_model_maps_its_objectness_head(tmp_path):
    cfg = cfg_for(tmp_path, "model.supervision=caption", "model.net.transformer_decoder.objectness=true")
    net = build(cfg)[1].net
    theirs = their_state_dict(tiny_dims(net), caption=True)
    converted, report = convert_state_dict(theirs, net.trainable_state_dict(), TAPS)
    for k in ("weight", "bias"):
        assert torch.equal(
            converted[f"transformer_decoder.class_embed.{k}"],
            theirs[f"sem_seg_head.predictor.class_embed.{k}"],
        )
    # caption models have no null embedding (the objectness head scores no-object instead)
    assert report["missing"] == ["classifier.null_embed"] and report["unmapped"] == []
    assert report["no_counterpart"] == []


def test_caption_checkpoint_needs_the_caption_experiment(tiny_net):
    theirs = their_state_dict(tiny_dims(tiny_net), caption=True)  # tiny_net: a label model
    with pytest.raises(
        CheckpointError, match="transformer_decoder.class_embed.weight, which this model does not"
    ):
        convert_state_dict(theirs, tiny_net.trainable_state_dict(), TAPS)


def test_shape_mismatch_names_both_keys(tiny_net):
    theirs = their_state_dict(tiny_dims(tiny_net))
    theirs["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(100, 256)
    with pytest.raises(
        CheckpointError,
        match=r"query_feat.weight \(100, 256\) does not fit transformer_decoder.query_feat.weight",
    ):
        convert_state_dict(theirs, tiny_net.trainable_state_dict(), TAPS)


def test_reads_detectron2_files_without_running_their_code(tmp_path, monkeypatch):
    pkg = tmp_path / "fake" / "detectron2" / "data"
    pkg.mkdir(parents=True)
    (tmp_path / "fake" / "detectron2" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "catalog.py").write_text("class Metadata:\n    def __init__(self):\n        self.name = 'coco'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    from detectron2.data.catalog import Metadata  # only to write the file

    path = tmp_path / "odise.pth"
    torch.save({"model": {"a": torch.ones(2), "metadata": Metadata()}, "iteration": 5}, path)
    for mod in [m for m in sys.modules if m.startswith("detectron2")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.syspath_prepend(str(tmp_path / "nothing"))
    assert list(read_their_checkpoint(path)) == ["a"]
    with pytest.raises(CheckpointError, match="not found"):
        read_their_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_their_checkpoint(tmp_path / "broken.pth")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["label", "caption"])
def test_full_size_models(tmp_path, kind):
    """Their full-size shapes (facts) against our full-size model (random weights, ~1 min each).

    The model is built in a child process: its 1.5B frozen parameters (6 GB) would otherwise stay
    in this process's memory beside the other slow tests' full-size runs.
    """
    import json
    import subprocess
    from pathlib import Path

    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path\n"
        "from hydra.utils import instantiate; from test_train import cfg_for\n"
        "cfg = cfg_for(Path(sys.argv[2]), f'experiment={sys.argv[3]}_1024', 'weights.mode=random', fast=False)\n"
        "sd = instantiate(cfg.model).net.trainable_state_dict()\n"
        "print(json.dumps({k: [list(v.shape), str(v.dtype)] for k, v in sd.items()}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path), kind],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    dtypes = {"torch.float32": torch.float32}
    ours = {
        k: torch.empty(shape, dtype=dtypes[dt], device="meta")
        for k, (shape, dt) in json.loads(res.stdout.strip().splitlines()[-1]).items()
    }
    converted, report = convert_state_dict(their_state_dict(FULL, caption=kind == "caption"), ours, TAPS)
    # a caption model has no null embedding: its objectness head scores no-object
    assert report["unmapped"] == [] and report["no_counterpart"] == []
    assert report["missing"] == ([] if kind == "label" else ["classifier.null_embed"])
    assert {k: v.shape for k, v in converted.items()} == {
        k: v.shape for k, v in ours.items() if k not in report["missing"]
    }


def test_script_end_to_end(tiny_net, tmp_path):
    import subprocess
    from pathlib import Path

    from safetensors.torch import load_file

    src = tmp_path / "odise_label.pth"
    torch.save({"model": their_state_dict(tiny_dims(tiny_net)), "iteration": 1}, src)
    out = tmp_path / "ours.safetensors"
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_odise_checkpoint.py"
    args = [sys.executable, str(script), str(src), str(out), "--experiment", "tiny", "--weights-mode", "tiny"]
    res = subprocess.run(
        [*args, "--override", "model.supervision=label"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipped 5 frozen tensors" in res.stdout and "WARNING" not in res.stdout
    assert set(load_file(str(out))) == set(tiny_net.trainable_state_dict())
    bad = subprocess.run([*args[:2], str(tmp_path / "none.pth"), str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "checkpoint not found" in bad.stderr
