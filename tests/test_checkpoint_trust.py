"""A checkpoint is data, never code: hostile `.ckpt` and `.safetensors` files (a stored config that
names a foreign callable, interpolates, or smuggles Hydra keywords) are refused by every entry point
that reads one, with one line naming the key and value, before anything is built; a marker file the
named callable would create never appears. Also: the allowlist and conf/ in step, the checkpoint
package without an import circle, and each file read once per load.

Entry points that read a checkpoint, and where each is tested here:
- `python -m odise_pl.eval` (API and CLI): test_eval_refuses / test_cli_refuses_in_one_line
- `python -m odise_pl.demo`: test_demo_refuses
- the notebooks' and other tools' loader `load_model`: test_load_model_refuses
- the web demo `python -m odise_pl.app` (its Segmenter): test_web_demo_refuses
- training's resume (`ckpt_path=`) and fine-tuning (`init_from=`): test_resume_and_init_from_refuse
- `python -m odise_pl.checkpoints export`: test_export_refuses
- the converter reads the authors' detectron2 files, which hold no config of ours; that it never
  runs their pickled objects is tests/test_convert.py::test_reads_detectron2_files_without_running_their_code
"""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

import odise_pl.train as train_module
from odise_pl.checkpoints import describe, read_checkpoint_file
from odise_pl.checkpoints.export import main as export_main
from odise_pl.checkpoints.trust import KEY, MODEL_TARGETS, UntrustedConfigError
from odise_pl.config import CONFIG_DIR
from odise_pl.data.synthetic import write_dataset
from odise_pl.demo import main as demo_main
from odise_pl.errors import OdiseError
from odise_pl.eval import evaluate
from odise_pl.inference.segment import load_model

from test_train import cfg_for

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "odise_pl"
# Shipped targets that configure the run, not the model: never in a checkpoint's model config.
NOT_MODEL_TARGETS = {
    "lightning.Trainer",
    "lightning.pytorch.strategies.DDPStrategy",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "odise_pl.experiment_loggers.wandb_logger",
    "odise_pl.sweep.SweepReport",
    "odise_pl.callbacks.visualize.PanopticVisualizer",
    "odise_pl.callbacks.training_guards.NonFiniteLossMonitor",
    "odise_pl.callbacks.progress.StepProgressBar",
    "odise_pl.datamodule.ODISEDataModule",
    "odise_pl.data.coco_panoptic.COCOPanopticDataset",
    "odise_pl.data.semantic.SemanticSegDataset",
    "odise_pl.data.transforms.ResizeShortestEdge",
    "odise_pl.data.transforms.LSJ",
}


def _targets(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["_target_"]} if isinstance(node.get("_target_"), str) else set()
        return found.union(*(_targets(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_targets(v) for v in node))
    return set()


def test_the_allowlist_is_conf_s_model_targets():
    """Every `_target_` in conf/ is either allowed in a stored model config or named here as a run
    setting: a new shipped target must be put on one side, consciously."""
    shipped = set()
    for f in Path(CONFIG_DIR).rglob("*.yaml"):
        shipped |= _targets(yaml.safe_load(f.read_text()) or {})
    assert not MODEL_TARGETS & NOT_MODEL_TARGETS
    assert shipped == MODEL_TARGETS | NOT_MODEL_TARGETS, (
        f"not in conf/: {sorted((MODEL_TARGETS | NOT_MODEL_TARGETS) - shipped)}; "
        f"not classified: {sorted(shipped - MODEL_TARGETS - NOT_MODEL_TARGETS)}"
    )


@pytest.mark.parametrize("experiment", sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml")))
@pytest.mark.parametrize("group", ["", "backbone=clip_l", "captioner=text", "captioner=empty"])
def test_every_shipped_model_config_passes_the_check(tmp_path, experiment, group):
    from odise_pl.checkpoints.trust import check_description

    cfg = cfg_for(tmp_path, f"experiment={experiment}", *([group] if group else []), fast=False)
    desc = describe(cfg, experiment)
    assert _targets(desc["model"]) <= MODEL_TARGETS
    assert check_description(json.loads(json.dumps(desc)), "x") == desc


# --- hostile files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(description, trainable state) of the tiny experiment, as training writes them."""
    tmp = tmp_path_factory.mktemp("good")
    cfg = cfg_for(tmp)
    net = instantiate(cfg.model.net)
    desc = {**describe(cfg, "tiny"), "vocabulary": [["circle"], ["sky"]], "isthing": [True, False]}
    return desc, {k: v.detach().clone() for k, v in net.trainable_state_dict().items()}


def hostile(desc: dict, kind: str, marker: Path) -> tuple[dict, str]:
    """(description, text its refusal names) of one kind of hostile stored config."""
    d = copy.deepcopy(desc)
    net = d["model"]["net"]
    if kind == "target":  # a standard-library function: would create the marker folder
        net["pixel_decoder"] = {"_target_": "os.makedirs", "name": str(marker)}
        return d, "model.net.pixel_decoder._target_='os.makedirs'"
    if kind == "open":  # the audit's file-open: would create (or empty) the marker file
        d["weights"]["extra"] = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
        return d, "weights.extra._target_='builtins.open'"
    if kind == "interpolation":  # a resolver: would run when resolved
        d["model"]["predictor"]["mode"] = "${odise_test_marker:}"
        return d, "model.predictor.mode='${odise_test_marker:}'"
    if kind == "env":  # the audit's environment read
        net["prompt"] = "${oc.env:HOME}"
        return d, "model.net.prompt='${oc.env:HOME}'"
    if kind == "args":  # Hydra keywords beyond _target_ / _partial_
        net["pixel_decoder"]["_args_"] = [str(marker)]
        return d, "model.net.pixel_decoder._args_"
    if kind == "type":  # allowed classes, in the wrong place: caught against the shipped config
        net["transformer_decoder"]["num_queries"] = {"_target_": "odise_pl.model.odise.ODISE"}
        return d, "model.net.transformer_decoder.num_queries="
    raise ValueError(kind)


KINDS = ["target", "open", "interpolation", "env", "args"]


@pytest.fixture()
def marker(tmp_path, monkeypatch):
    path = tmp_path / "marker"
    if not OmegaConf.has_resolver("odise_test_marker"):
        OmegaConf.register_new_resolver("odise_test_marker", lambda: Path(MARKERS[-1]).touch() or "ensemble")
    MARKERS.append(str(path))
    yield path
    assert not path.exists(), "the hostile config ran"


MARKERS: list[str] = []


def write(path: Path, desc: dict, state: dict) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={KEY: json.dumps(desc)})
    else:
        torch.save(
            {"state_dict": {f"net.{k}": v for k, v in state.items()}, "global_step": 1, KEY: desc}, path
        )
    return path


@pytest.fixture(params=[".ckpt", ".safetensors"])
def suffix(request):
    return request.param


def make(tmp_path, good, kind, marker, suffix):
    desc, named = hostile(good[0], kind, marker)
    return write(tmp_path / f"hostile{suffix}", desc, good[1]), named


@pytest.mark.parametrize("kind", KINDS)
def test_read_refuses_naming_key_and_value(tmp_path, good, marker, suffix, kind):
    path, named = make(tmp_path, good, kind, marker, suffix)
    with pytest.raises(UntrustedConfigError) as err:
        read_checkpoint_file(path)
    assert named in str(err.value) and str(path) in str(err.value)
    assert "trust_checkpoint_config=true" in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_refuses(tmp_path, good, marker, suffix, kind):
    path, named = make(tmp_path, good, kind, marker, suffix)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/e", f"ckpt_path={path}"],
        )
    with pytest.raises(UntrustedConfigError, match=named.replace("$", r"\$").replace("{", r"\{")):
        evaluate(cfg)


@pytest.mark.parametrize("kind", [*KINDS, "type"])
def test_load_model_refuses(tmp_path, good, marker, suffix, kind):
    path, _ = make(tmp_path, good, kind, marker, suffix)
    with pytest.raises(UntrustedConfigError):
        load_model(checkpoint=str(path))


@pytest.mark.parametrize("kind", ["target", "interpolation"])
def test_demo_refuses(tmp_path, good, marker, suffix, kind, capsys):
    path, named = make(tmp_path, good, kind, marker, suffix)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    args = [
        "--image",
        str(image),
        "--vocab",
        "cat",
        "--output",
        str(tmp_path / "out"),
        "--checkpoint",
        str(path),
    ]
    assert demo_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0]


@pytest.mark.parametrize("kind", ["target", "open"])
def test_web_demo_refuses(tmp_path, good, marker, suffix, kind):
    from odise_pl.app import Segmenter

    path, named = make(tmp_path, good, kind, marker, suffix)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    segmenter = Segmenter({"hostile": str(path)}, out_root=tmp_path / "app")
    with pytest.raises(UntrustedConfigError, match="refused"):
        segmenter(str(image), "cat", [], "hostile")


@pytest.mark.parametrize(
    "key, kind",
    [("ckpt_path", "target"), ("ckpt_path", "env"), ("init_from", "target"), ("init_from", "interpolation")],
)
def test_resume_and_init_from_refuse(tmp_path, good, marker, suffix, key, kind, monkeypatch):
    path, _ = make(tmp_path, good, kind, marker, suffix)

    def refuse(*a, **k):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(train_module, "build", refuse)
    with pytest.raises(UntrustedConfigError):
        train_module.train(cfg_for(tmp_path, f"{key}={path}"))


def test_export_refuses(tmp_path, good, marker, capsys):
    path, named = make(tmp_path, good, "target", marker, ".ckpt")
    out = tmp_path / "out.safetensors"
    assert export_main(["export", str(path), str(out)]) == 2
    assert named in capsys.readouterr().err and not out.exists()


def test_cli_refuses_in_one_line(tmp_path, good):
    """The shell's view: `python -m odise_pl.eval ckpt_path=HOSTILE` exits 2 with one line and no
    traceback, and the callable never ran."""
    marker = tmp_path / "marker"
    desc, _ = hostile(good[0], "target", marker)
    path = write(tmp_path / "hostile.safetensors", desc, good[1])
    res = subprocess.run(
        [sys.executable, "-m", "odise_pl.eval", f"ckpt_path={path}", f"paths.root_dir={tmp_path}",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        "Traceback" not in res.stderr
        and "refused model.net.pixel_decoder._target_='os.makedirs'" in res.stderr
    )
    assert not marker.exists()


def test_trust_opt_in_builds_what_the_file_names(tmp_path, good):
    """The opt-in is real (and proves the hostile file is hostile): trusted, the stored callable runs."""
    marker = tmp_path / "marker"
    desc, _ = hostile(good[0], "target", marker)
    path = write(tmp_path / "trusted.ckpt", desc, good[1])
    # os.makedirs returns None: the model cannot be built or loaded with it
    with pytest.raises((InstantiationException, OdiseError)):
        load_model(checkpoint=str(path), trust_config=True)
    assert marker.is_dir()
    # a user's own class (here a library optimiser) builds when trusted, and is refused otherwise
    desc = copy.deepcopy(good[0])
    desc["model"]["optimizer"]["_target_"] = "torch.optim.SGD"
    desc["model"]["optimizer"].pop("weight_decay", None)
    path = write(tmp_path / "sgd.safetensors", desc, good[1])
    with pytest.raises(UntrustedConfigError, match="torch.optim.SGD"):
        load_model(checkpoint=str(path))
    _, cfg = load_model(checkpoint=str(path), trust_config=True)
    assert cfg.model.optimizer._target_ == "torch.optim.SGD"


def test_format_1_references_are_substituted_by_lookup(tmp_path, good):
    """Files written before plain values (format 1) kept `${weights.*}` / `${model.*}` references:
    they still load, each reference replaced by the value it names, and nothing else passes."""
    desc = copy.deepcopy(good[0])
    desc["format"] = 1
    desc["model"]["net"]["backbone"]["unet"]["mode"] = "${weights.mode}"
    desc["model"]["net"]["transformer_decoder"]["in_channels"] = "${model.net.pixel_decoder.conv_dim}"
    read = read_checkpoint_file(write(tmp_path / "v1.ckpt", desc, good[1])).description
    assert read["model"]["net"]["backbone"]["unet"]["mode"] == "tiny"
    assert (
        read["model"]["net"]["transformer_decoder"]["in_channels"]
        == desc["model"]["net"]["pixel_decoder"]["conv_dim"]
    )
    module, _ = load_model(checkpoint=str(tmp_path / "v1.ckpt"))
    assert module.net.transformer_decoder is not None
    desc["model"]["net"]["prompt"] = "${oc.env:HOME}"  # a resolver is still refused in format 1
    with pytest.raises(UntrustedConfigError, match="oc.env"):
        read_checkpoint_file(write(tmp_path / "v1bad.ckpt", desc, good[1]))


def test_integer_tensors_are_refused(tmp_path, good):
    desc, state = good
    state = dict(state)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].round().to(torch.int64)
    path = write(tmp_path / "ints.safetensors", desc, state)
    with pytest.raises(OdiseError, match=f"{key} is torch.int64 in the file"):
        load_model(checkpoint=str(path))


# --- one home, read once ------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_no_import_circle_in_the_checkpoint_package():
    pkg = SRC / "checkpoints"
    mods = {
        f"odise_pl.checkpoints.{p.stem}": p
        for p in pkg.glob("*.py")
        if p.stem not in ("__init__", "__main__")
    }
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    assert not [m for m in graph if m in reach(m)], graph
    assert not (SRC / "checkpoint.py").exists() and not (SRC / "checkpoint_config.py").exists()
    assert not (SRC / "convert.py").exists()


def test_each_file_is_read_once_per_load(tmp_path, good, monkeypatch):
    import odise_pl.checkpoints.files as files

    reads: list[str] = []
    real_load, real_open = files.safe_torch_load, files.safe_open
    monkeypatch.setattr(files, "safe_torch_load", lambda p, **k: reads.append(str(p)) or real_load(p, **k))
    monkeypatch.setattr(files, "safe_open", lambda p, **k: reads.append(str(p)) or real_open(p, **k))
    write_dataset(tmp_path / "data" / "synthetic", num_train=1, num_val=1, seed=0)
    for suffix in (".ckpt", ".safetensors"):
        path = write(tmp_path / f"good{suffix}", good[0], good[1])
        reads.clear()
        load_model(checkpoint=str(path))
        assert reads == [str(path)]
        reads.clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("eval", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/e",
                                             f"ckpt_path={path}", "max_images=1", "loader.num_workers=0"])  # fmt: skip
        evaluate(cfg)
        assert reads == [str(path)]


def test_resume_reads_the_file_once(tmp_path, monkeypatch):
    """Training checks the resume checkpoint before building the model, and Lightning's restore gets
    that same read instead of opening the file again."""
    import odise_pl.checkpoints.files as files

    first = tmp_path / "first"
    train_module.train(
        cfg_for(first, "trainer.max_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1")
    )
    last = first / "out" / "checkpoints" / "last.ckpt"
    reads: list[str] = []
    real_load = files.safe_torch_load
    monkeypatch.setattr(files, "safe_torch_load", lambda p, **k: reads.append(str(p)) or real_load(p, **k))
    train_module.train(cfg_for(tmp_path / "second", "trainer.max_steps=2", f"ckpt_path={last}"))
    assert reads == [str(last)]


def test_weight_locations_never_come_from_the_file(tmp_path, good):
    """A stored `source` / `pretrained` / `checkpoint` leaf is replaced by this machine's value, even
    where the shipped config has none (null): a file never chooses what this machine reads."""
    desc = copy.deepcopy(good[0])
    desc["model"]["net"]["backbone"]["unet"]["source"] = "/somewhere/else/sd"
    desc["model"]["net"]["clip"]["model"]["pretrained"] = "/tmp/evil.bin"
    desc["weights"]["sd_source"] = "/somewhere/else/sd"
    desc["model"]["net"]["backbone"]["unet"]["unet_source"] = "/somewhere/else/unet"
    desc["weights"]["unet_source"] = "/somewhere/else/unet"
    path = write(tmp_path / "loc.safetensors", desc, good[1])
    _, cfg = load_model(checkpoint=str(path))
    assert cfg.model.net.backbone.unet.unet_source is None and cfg.weights.unet_source is None
    assert cfg.model.net.backbone.unet.source != "/somewhere/else/sd"
    assert cfg.model.net.clip.model.pretrained != "/tmp/evil.bin"
    assert cfg.weights.sd_source != "/somewhere/else/sd"


def test_a_runtime_cache_size_is_the_users_not_a_contradiction(tmp_path, good):
    """The web demo sets model.net.vocab_cache_mb on every model it loads: a test-time setting like
    model.predictor.*, never a clash with the file's architecture."""
    path = write(tmp_path / "m.safetensors", good[0], good[1])
    module, cfg = load_model(checkpoint=str(path), overrides=["model.net.vocab_cache_mb=7"])
    assert cfg.model.net.vocab_cache_mb == 7 and module.net._vocab_cache.max_bytes == 7 * 2**20
