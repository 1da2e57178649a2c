import json
import logging
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from odise_pl.checkpoints import load_trainable, read_checkpoint_file, resolve_from_checkpoint
from odise_pl.checkpoints.export import export_safetensors
from odise_pl.config import CONFIG_DIR
from odise_pl.errors import CheckpointError, ConfigError
from odise_pl.eval import evaluate
from odise_pl.inference.segment import load_model
from odise_pl.train import build, train

from test_train import cfg_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    # Not the default size: evaluation must rebuild the model from the checkpoint's own description.
    train(
        cfg_for(
            tmp,
            "callbacks.model_checkpoint.every_n_train_steps=2",
            f"model.net.transformer_decoder.num_queries={QUERIES}",
        )
    )
    return tmp, tmp / "out" / "checkpoints" / "last.ckpt"


QUERIES = 12


def eval_cfg(tmp, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "eval", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/eval", *overrides]
        )


def test_eval_prints_pq_miou_ap_and_writes_results(trained, caplog):
    caplog.set_level(logging.INFO, logger="odise_pl")
    tmp, ckpt = trained
    res = evaluate(eval_cfg(tmp, f"ckpt_path={ckpt}"))
    metrics = res["synthetic val"]
    assert {"pq", "pq_th", "pq_st", "miou", "ap"} <= set(metrics)
    out = caplog.text
    assert "| synthetic val |" in out and "mIoU" in out
    saved = json.load(open(tmp / "eval" / "results.json"))
    assert saved["results"]["synthetic val"]["pq"] == pytest.approx(metrics["pq"])
    # the exported safetensors file gives the same numbers
    st = export_safetensors(ckpt, tmp / "model.safetensors")
    res2 = evaluate(eval_cfg(tmp, f"ckpt_path={st}"))
    assert res2["synthetic val"] == pytest.approx(metrics)


def test_checkpoint_errors(trained, tmp_path):
    tmp, ckpt = trained
    _, module, _ = build(cfg_for(tmp_path))
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_trainable(module.net, truncated)
    _, other, _ = build(cfg_for(tmp_path, "model.net.transformer_decoder.num_queries=5"))
    with pytest.raises(CheckpointError, match="shapes differ|does not fit"):
        load_trainable(other.net, ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_trainable(module.net, tmp_path / "nope.ckpt")


def test_checkpoint_describes_its_model(trained, tmp_path):
    tmp, ckpt = trained
    desc = read_checkpoint_file(ckpt).description
    assert desc["model"]["net"]["transformer_decoder"]["num_queries"] == QUERIES
    assert desc["model"]["supervision"] == "label" and desc["weights"]["mode"] == "tiny"
    assert desc["vocabulary"] and len(desc["vocabulary"]) == len(desc["isthing"])
    # a stored config is plain values: no interpolation anywhere
    assert "${" not in json.dumps(desc)
    st = export_safetensors(ckpt, tmp_path / "m.safetensors")
    assert read_checkpoint_file(st).description == desc
    # the demo / notebooks rebuild it with no experiment
    module, _ = load_model(checkpoint=str(st))
    assert module.net.transformer_decoder.query_feat.weight.shape[0] == QUERIES
    # test-time settings and weight locations given explicitly are the user's
    cfg = resolve_from_checkpoint(
        eval_cfg(tmp, f"ckpt_path={st}", "model.predictor.mode=clip", "weights.sd_source=/elsewhere/sd"),
        desc,
        st,
        "eval",
    )
    assert cfg.model.predictor.mode == "clip" and cfg.model.net.backbone.unet.source == "/elsewhere/sd"
    # where frozen weights are read from is never the file's: without an override, the shipped default
    stored = json.loads(json.dumps(desc))
    stored["model"]["net"]["backbone"]["unet"]["source"] = "/the/training/machine/sd"
    stored["weights"]["sd_source"] = "/the/training/machine/sd"
    cfg = resolve_from_checkpoint(eval_cfg(tmp, f"ckpt_path={st}"), stored, st, "eval")
    assert cfg.model.net.backbone.unet.source == eval_cfg(tmp).weights.sd_source
    assert cfg.model.net.transformer_decoder.num_queries == QUERIES


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.net.transformer_decoder.num_queries=20", f"num_queries=20 .the checkpoint: {QUERIES}"),
        ("model.supervision=caption", "model.supervision='caption' .the checkpoint: 'label'"),
        ("experiment=caption_512", "unet.mode='pretrained' .the checkpoint: 'tiny'"),
    ],
)
def test_a_contradicting_config_names_both_values(trained, override, message):
    tmp, ckpt = trained
    with pytest.raises(ConfigError, match=message):
        evaluate(eval_cfg(tmp, f"ckpt_path={ckpt}", override))
    with pytest.raises(ConfigError, match=message):
        load_model(checkpoint=str(ckpt), overrides=[override])


@pytest.mark.slow
def test_two_process_evaluation_equals_one(trained, tmp_path):
    """`python -m odise_pl.eval trainer=ddp_cpu trainer.devices=2`: each process scores its share of
    the images, the metric states are synchronised: the same numbers as one process."""
    tmp, ckpt = trained
    single = evaluate(eval_cfg(tmp, f"ckpt_path={ckpt}", "max_images=5", "loader.num_workers=0"))
    out = tmp_path / "two"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "odise_pl.eval",
            f"ckpt_path={ckpt}",
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "max_images=5",  # odd: the processes get 3 and 2 images
            "loader.num_workers=0",
            f"paths.root_dir={tmp}",
            f"paths.output_dir={out}",
            f"hydra.run.dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["processes"] == 2
    assert saved["results"]["synthetic val"] == pytest.approx(single["synthetic val"], abs=1e-9)
    assert res.stdout.count("| synthetic val |") == 1  # one table, from the first process
    assert "| synthetic val |" in (out / "eval.log").read_text()


def test_batched_evaluation_with_workers(trained):
    tmp, ckpt = trained
    res = evaluate(
        eval_cfg(tmp, f"ckpt_path={ckpt}", "max_images=5", "loader.batch_size=2", "loader.num_workers=1")
    )
    metrics = res["synthetic val"]
    assert {"pq", "miou", "ap"} <= set(metrics) and all(0 <= v <= 100 for v in metrics.values())
