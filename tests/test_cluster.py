"""Sweeps at cluster scale: the SLURM launcher's config, a 2-point sweep through submitit's local
executor, and W&B runs named after their experiment that a resumed run continues."""

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from odise_pl.config import CONFIG_DIR
from odise_pl.experiment_loggers import ID_FILE, names_for, run_id

FAST = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=1000",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.synthetic.num_train=4",
    "data.synthetic.num_val=2",
    "callbacks.progress.refresh_rate=0",
    "trainer.enable_model_summary=false",
]


def test_slurm_launcher_takes_nodes_gpus_time_partition_from_config():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "trainer=ddp",
                "trainer.num_nodes=2",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=60",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # one DDP job per sweep point: a task per GPU on each of trainer.num_nodes nodes
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert (launcher.partition, launcher.timeout_min, launcher.max_num_timeout) == ("gpu", 60, 3)
    assert launcher.signal_delay_s > 0  # SIGTERM before the limit: SaveOnPreemption writes last.ckpt
    # the values the launcher hands to submitit are all known to it
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    assert set(OmegaConf.to_container(launcher)) <= set(OmegaConf.structured(SlurmQueueConf)) | {"_target_"}


@pytest.mark.slow
def test_two_point_sweep_through_submitit_with_named_wandb_runs(tmp_path):
    """A 2-point sweep as submitit jobs (its local executor), each point logging to its own
    offline W&B run, named after the experiment and the point's override."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "odise_pl.train",
        "-m",
        "hydra/launcher=local",
        "logger=wandb",
        "model.optimizer.lr=1e-3,2e-3",
        *FAST,
        f"paths.root_dir={tmp_path}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "train").iterdir()
    points = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in points] == ["0", "1"]
    ids = set()
    for point, lr in zip(points, ("0.001", "0.002")):
        assert "pq" in " ".join(json.loads((point / "metrics.json").read_text()))
        log = (point / "train.log").read_text()
        rid = (point / ID_FILE).read_text().strip()
        ids.add(rid)
        # name: experiment + the point's override (not the plumbing: logger=, callbacks., num_workers)
        assert f"W&B run tiny model.optimizer.lr={lr} trainer.max_steps=2" in log
        assert f"(id {rid}, group tiny/{sweep.name})" in log
        assert list((point / "wandb").glob(f"offline-run-*-{rid}"))
    assert len(ids) == 2
    assert list((sweep / ".submitit").iterdir())  # the jobs' submitit records
    # one table of the sweep (README "Experiments, ablations, scale-out")
    table = subprocess.run(
        [sys.executable, "scripts/collect_runs.py", str(sweep)], capture_output=True, text=True, check=True
    ).stdout
    rows = [line for line in table.splitlines() if line.startswith("| model.optimizer.lr=")]
    assert [r.split("|")[1].strip() for r in rows] == ["model.optimizer.lr=0.001", "model.optimizer.lr=0.002"]
    assert all("failed" not in r for r in rows)


def test_a_resumed_run_names_the_checkpoint_for_its_wandb_id(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["logger=wandb", f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt"])
    assert cfg.logger.wandb.resume_from == f"{tmp_path}/run/checkpoints/last.ckpt"
    assert cfg.logger.wandb._target_ == "odise_pl.experiment_loggers.wandb_logger"


def test_wandb_names_come_from_the_experiment_and_the_overrides():
    name, group, tags = names_for(
        {
            "experiment": "caption_512",
            "overrides": ["captioner=empty", "seed=1"],
            "sweep": "2026-12-01_10-00-00",
        }
    )
    assert name == "caption_512 captioner=empty seed=1"
    assert group == "caption_512/2026-12-01_10-00-00"
    assert tags == ["caption_512", "train", "captioner=empty", "seed=1"]
    assert names_for({"experiment": None, "overrides": []}, "eval") == ("eval", "eval", ["eval"])


def test_wandb_id_is_kept_in_the_run_folder(tmp_path):
    first = tmp_path / "run1"
    rid = run_id(first)
    assert (first / ID_FILE).read_text().strip() == rid
    assert run_id(first) == rid  # a requeued job: the same folder, the same W&B run
    # resumed with ckpt_path= into a new folder: the checkpoint's run's id, now kept here too
    second = tmp_path / "run2"
    assert run_id(second, first / "checkpoints" / "last.ckpt") == rid
    assert (second / ID_FILE).read_text().strip() == rid
    assert run_id(tmp_path / "run3") != rid
