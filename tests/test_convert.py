"""Converting the authors' checkpoints. Their full-size key lists (names, shapes, trainable flags,
weight decay) come from ``shared/parity/keys_*_full.json``, produced by the official code: a state
dict with exactly those names and shapes must convert completely, and our full-size model must have
the same trainable tensors, count and weight-decay groups. The numbers themselves are checked against
the official code's outputs in ``tests/test_official_parity.py``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from odise_pl.checkpoints import read_checkpoint_file
from odise_pl.checkpoints.official import convert_state_dict, official_name, read_their_checkpoint
from odise_pl.errors import CheckpointError
from odise_pl.optim import weight_decay_of
from odise_pl.weights import count_parameters
from test_official_parity import PARITY

from test_train import cfg_for

KINDS = ["label", "caption"]


def official_keys(kind: str) -> dict:
    path = PARITY / f"keys_{kind}_full.json"
    if not path.is_file():
        pytest.skip(f"no official key list {path}")
    return json.loads(path.read_text())


def official_state_dict(kind: str, frozen: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A released checkpoint's ``model`` dict: every official name and shape, random values, plus
    the first ``frozen`` frozen tensors the official model also holds.
    """
    keys = official_keys(kind)
    g = torch.Generator().manual_seed(seed)
    sd = {name: torch.randn(shape, generator=g) for name, shape, *_ in keys["checkpoint_model_dict"]["keys"]}
    for name, shape in keys["frozen_not_in_checkpoint"]["keys"][:frozen]:
        sd[name] = torch.zeros(shape)
    return sd


@pytest.fixture(scope="module", params=KINDS)
def full_size(request, tmp_path_factory):
    """(kind, our full-size LightningModule on the meta device: shapes without memory)."""
    cfg = cfg_for(
        tmp_path_factory.mktemp(request.param),
        f"experiment={request.param}_1024",
        "weights.mode=meta",
        fast=False,
    )
    return request.param, instantiate(cfg.model)


def test_full_size_has_the_official_trainable_tensors_and_weight_decay(full_size):
    kind, module = full_size
    net, keys = module.net, official_keys(kind)["checkpoint_model_dict"]
    ours = net.trainable_state_dict()
    order = list(net.backbone.feature_info())
    head = "category_head" if kind == "label" else "word_head"
    names = {official_name(k, order, head): k for k in ours}
    trainable = {row[0]: row for row in keys["keys"] if row[4]}
    assert set(names) == set(trainable)  # one to one, nothing extra on either side
    assert {n: list(ours[k].shape) for n, k in names.items()} == {n: r[1] for n, r in trainable.items()}
    assert count_parameters(net, trainable=True) == keys["num_trainable_values"]  # 28,067,009 for label
    decay = weight_decay_of(module, module.optimizer_factory.keywords["weight_decay"], 0.0, 0.0)
    assert {n: decay[f"net.{k}"] for n, k in names.items()} == {n: r[5] for n, r in trainable.items()}


def test_full_size_official_checkpoint_converts_completely(full_size):
    kind, module = full_size
    theirs = official_state_dict(kind)
    ours = module.net.trainable_state_dict()
    converted, report = convert_state_dict(theirs, ours, list(module.net.backbone.feature_info()))
    assert set(converted) == set(ours) and report["unmapped"] == []
    assert [d.split(" ")[0] for d in report["derived"]] == ["criterion.empty_weight"]
    assert len(report["skipped_frozen"]) == 3
    # spot checks of names worked out by hand from the official code
    assert torch.equal(
        converted["pyramid.blocks.unet_up_2.shortcut.0.weight"],
        theirs["backbone.feature_projections.2.0.shortcut.weight"],
    )
    assert torch.equal(
        converted["pixel_decoder.output.1.weight"], theirs["sem_seg_head.pixel_decoder.layer_1.norm.weight"]
    )
    head = "category_head" if kind == "label" else "word_head"
    assert torch.equal(converted["classifier.text_proj.weight"], theirs[f"{head}.text_proj.weight"])
    assert torch.equal(
        converted["captioner.time_pos_embed"],
        theirs["backbone.feature_extractor.time_embed_project.positional_embedding"],
    )


def test_missing_tensors_are_listed(full_size):
    kind, module = full_size
    theirs = official_state_dict(kind, frozen=0)
    gone = ["sem_seg_head.predictor.query_feat.weight", "backbone.feature_projections.5.0.conv2.weight"]
    for key in gone:
        del theirs[key]
    with pytest.raises(CheckpointError, match="lacks 2 tensors") as err:
        convert_state_dict(
            theirs, module.net.trainable_state_dict(), list(module.net.backbone.feature_info())
        )
    assert all(key in str(err.value) for key in gone)


def test_shape_mismatch_names_both_keys(full_size):
    kind, module = full_size
    theirs = official_state_dict(kind, frozen=0)
    theirs["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(50, 256)
    with pytest.raises(
        CheckpointError,
        match=r"query_feat.weight \(50, 256\) does not fit our transformer_decoder.query_feat.weight",
    ):
        convert_state_dict(
            theirs, module.net.trainable_state_dict(), list(module.net.backbone.feature_info())
        )


def test_a_checkpoint_of_the_other_kind_is_refused(full_size):
    kind, module = full_size
    other = official_state_dict("caption" if kind == "label" else "label", frozen=0)
    with pytest.raises(CheckpointError, match="lacks"):
        convert_state_dict(other, module.net.trainable_state_dict(), list(module.net.backbone.feature_info()))


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


def test_script_end_to_end(tmp_path):
    """The script on a full-size official label checkpoint: every tensor mapped, one file written."""
    src = tmp_path / "odise_label.pth"
    torch.save({"model": official_state_dict("label"), "iteration": 92188}, src)
    out = tmp_path / "ours.safetensors"
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_odise_checkpoint.py"
    res = subprocess.run(
        [sys.executable, str(script), str(src), str(out)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "experiment=label_1024" in res.stdout and "mapped 398 tensors (28.07M values)" in res.stdout
    assert "skipped 3 frozen tensors" in res.stdout and "WARNING" not in res.stdout
    keys = official_keys("label")["checkpoint_model_dict"]["keys"]
    assert len(load_file(str(out))) == sum(1 for row in keys if row[4])
    # self-describing: the model to rebuild is in the file (no experiment= at evaluation)
    desc = read_checkpoint_file(out).description
    assert desc["experiment"] == "label_1024" and desc["model"]["supervision"] == "label"
    assert desc["weights"]["mode"] == "pretrained" and len(desc["vocabulary"]) == 133
    bad = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "none.pth"), str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "checkpoint not found" in bad.stderr
