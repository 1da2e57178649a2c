"""Train ODISE: ``python -m odise_pl.train [experiment=...] [key=value ...]``.

Composes the Hydra config (``conf/train.yaml``), prints it, builds datamodule, model, callbacks,
loggers and trainer, trains, then validates and prints panoptic quality.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from odise_pl.checkpoint import AtomicCheckpointIO
from odise_pl.config import check_config
from odise_pl.errors import exit_on_user_error

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# `${wandb_offline:}`: log offline (sync later) unless the user has a W&B API key.
if not OmegaConf.has_resolver("wandb_offline"):
    OmegaConf.register_new_resolver("wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"))


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every ``_target_`` node of a group like ``callbacks`` / ``logger``."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def build(cfg: DictConfig):
    """(datamodule, module, trainer) from a composed config. Values are checked against the
    targets' signatures and everything is built before any training starts, so a bad key or value
    fails at start-up.
    """
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model)
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    if not loggers:  # `logger=none`: nothing to monitor the learning rate into (Lightning would refuse)
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    if datamodule.global_batch_size:
        datamodule.batch_size, trainer.accumulate_grad_batches = split_global_batch(
            int(datamodule.global_batch_size), int(datamodule.batch_size), trainer.world_size
        )
    return datamodule, module, trainer


def split_global_batch(global_batch: int, max_per_device: int, world: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) giving exactly ``global_batch`` on ``world`` devices,
    with at most ``max_per_device`` images per device and step (the paper: 64 = 8 GPUs x 8).
    """
    if global_batch % world:
        raise ValueError(f"data.global_batch_size={global_batch} is not divisible by the {world} devices")
    per_world = global_batch // world
    for accumulate in range(1, per_world + 1):
        if per_world % accumulate == 0 and per_world // accumulate <= max_per_device:
            return per_world // accumulate, accumulate
    raise ValueError(f"cannot split data.global_batch_size={global_batch} over {world} devices")


def format_metrics(metrics: dict) -> str:
    """``PQ 43.2 (th 50.1, st 30.2)  SQ ..  RQ ..  mIoU ..  AP ..`` from a metrics dict (values in %)."""
    m = {k.split("/", 1)[-1]: float(v) for k, v in metrics.items()}
    parts = []
    if "pq" in m:
        parts.append(f"PQ {m['pq']:.1f} (things {m.get('pq_th', 0):.1f}, stuff {m.get('pq_st', 0):.1f})")
        parts += [f"SQ {m['sq']:.1f}", f"RQ {m['rq']:.1f}"]
    for key, name in (("miou", "mIoU"), ("ap", "AP"), ("ap50", "AP50")):
        if key in m:
            parts.append(f"{name} {m[key]:.1f}")
    return "  ".join(parts)


def git_commit() -> str:
    """The code's git commit (``-dirty`` with uncommitted changes), or ``unknown`` outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def train(cfg: DictConfig) -> dict:
    """Train (and validate) per ``cfg``; returns the final validation metrics."""
    print(OmegaConf.to_yaml(cfg, resolve=True))
    torch.set_float32_matmul_precision("high")
    datamodule, module, trainer = build(cfg)
    # The resolved config and the code version, with every run.
    hparams = {"config": OmegaConf.to_container(cfg, resolve=True), "git_commit": git_commit()}
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
    before = {}
    if cfg.get("validate_before_training"):
        before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        print(f"before training: {format_metrics(before)}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    if before:
        print(f"before training: {format_metrics(before)}")
    print(f"after training:  {format_metrics(metrics)}")
    if trainer.is_global_zero:  # for scripts/collect_runs.py and other tooling
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({k: float(v) for k, v in metrics.items()}, indent=1))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns val/pq (for Hydra sweepers)."""
    metrics = train(cfg)
    # Multiruns execute jobs in this process: free the finished job's model now (trainer <-> module
    # reference cycles would otherwise keep a 1.5B-parameter model alive into the next job).
    gc.collect()
    return float(metrics.get("val/pq", 0.0))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
