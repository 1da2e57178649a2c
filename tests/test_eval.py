import json

import pytest
from hydra import compose, initialize_config_dir

from odise_pl.checkpoint import export_safetensors, load_trainable
from odise_pl.config import CONFIG_DIR
from odise_pl.errors import CheckpointError
from odise_pl.eval import evaluate
from odise_pl.train import build, train

from test_train import cfg_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    train(cfg_for(tmp, "callbacks.model_checkpoint.every_n_train_steps=2"))
    return tmp, tmp / "out" / "checkpoints" / "last.ckpt"


def eval_cfg(tmp, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "eval", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/eval", *overrides]
        )


def test_eval_prints_pq_miou_ap_and_writes_results(trained, capsys):
    tmp, ckpt = trained
    res = evaluate(eval_cfg(tmp, f"ckpt_path={ckpt}"))
    metrics = res["synthetic val"]
    assert {"pq", "pq_th", "pq_st", "miou", "ap"} <= set(metrics)
    out = capsys.readouterr().out
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
