"""Train ODISE: ``python -m odise_pl.train [experiment=...] [key=value ...]``.

Composes the Hydra config (``conf/train.yaml``), prints it, builds datamodule, model, callbacks,
loggers and trainer, trains, then validates and prints panoptic quality.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from odise_pl.callbacks.preemption import Preempted, SaveFinalState, SaveOnPreemption, newest_checkpoint
from odise_pl.callbacks.training_guards import BadSampleReport, ConfiguredOptimizerOnResume
from odise_pl.checkpoints import (
    AtomicCheckpointIO,
    CheckpointFile,
    describe,
    describe_mismatch,
    load_trainable,
    read_checkpoint_file,
)
from odise_pl.config import CONFIG_DIR, check_config
from odise_pl.errors import CheckpointError, ConfigError, exit_on_user_error, say_error
from odise_pl.fs import RunLock, remove_stale_partials
from odise_pl.log_setup import get_logger

log = get_logger(__name__)


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every ``_target_`` node of a group like ``callbacks`` / ``logger``."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def build(cfg: DictConfig, resume: CheckpointFile | None = None):
    """(datamodule, module, trainer) from a composed config. Values are checked against the
    targets' signatures and everything is built before any training starts, so a bad key or value
    fails at start-up. ``resume``: the checkpoint :func:`check_resume` read, handed to Lightning's
    resume so that the file is read once.
    """
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model)
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    if not loggers:  # `logger=none`: nothing to monitor the learning rate into (Lightning would refuse)
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    # Always on: what a long run needs whatever the callbacks config says; the final state's save
    # first, so that no other callback's end-of-training hook runs before it.
    callbacks = [
        SaveFinalState(),
        *callbacks,
        SaveOnPreemption(),
        ConfiguredOptimizerOnResume(),
        BadSampleReport(),
    ]
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO(resume)]
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


def check_architecture(cfg: DictConfig, ckpt: CheckpointFile, what: str) -> None:
    """``ckpt``'s trainable tensors have this config's names and shapes: otherwise one error naming
    both values, before the model is built (ours is sized on the meta device).
    """
    meta = cfg.copy()
    with open_dict(meta):
        if meta.weights.mode != "tiny":  # tiny models are built in a moment; others only as shapes
            meta.weights.mode = "meta"
    ours = {
        k: tuple(v.shape) for k, v in hydra.utils.instantiate(meta.model.net).trainable_state_dict().items()
    }
    theirs = ckpt.shapes()
    if theirs != ours:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was trained with another architecture: "
            + "; ".join(describe_mismatch(theirs, ours))
            + f". {what} with the experiment= and model overrides it was trained with"
        )


def check_resume(cfg: DictConfig) -> CheckpointFile:
    """``ckpt_path`` is readable, its stored config is data (:mod:`odise_pl.checkpoints.trust`) and
    it was trained with this architecture, before the model is built. Returns the file, read once.
    """
    path = Path(cfg.ckpt_path)
    ckpt = read_checkpoint_file(path, trust=cfg.get("trust_checkpoint_config", False))
    if ckpt.raw is None:
        raise CheckpointError(
            f"{path} holds weights only (an export); resume from the run's .ckpt (it holds the optimiser "
            f"and step), or start a new run from these weights with init_from={path}"
        )
    check_architecture(cfg, ckpt, "Resume")
    return ckpt


def check_init(cfg: DictConfig) -> CheckpointFile:
    """``init_from`` (a ``.ckpt``, ``.safetensors`` or converted release) read once and checked like a
    resume checkpoint, before the model is built.
    """
    ckpt = read_checkpoint_file(cfg.init_from, trust=cfg.get("trust_checkpoint_config", False))
    check_architecture(cfg, ckpt, "Fine-tune")
    return ckpt


def init_report(ckpt: CheckpointFile, cfg: DictConfig) -> str:
    """What ``init_from`` loaded and what starts fresh, for the log."""
    parts = sorted({k.split(".", 1)[0] for k in ckpt.state})
    values = sum(v.numel() for v in ckpt.state.values())
    trained_on = (ckpt.description or {}).get("vocabulary")
    vocab = (
        f"the file was trained on {len(trained_on)} categories, this run has its dataset's own: "
        if trained_on
        else ""
    )
    return (
        f"init_from {ckpt.path}: loaded {len(ckpt.state)} trainable tensors ({values / 1e6:.2f}M values: "
        f"{', '.join(parts)}); fresh: optimiser ({cfg.model.optimizer._target_.rsplit('.', 1)[-1]}, "
        f"lr {cfg.model.optimizer.lr}), schedule and step counter (0 of {cfg.trainer.max_steps}); frozen "
        f"weights from weights.*. {vocab}the classifier is text-driven (CLIP text embeddings through "
        "text_proj), so a new vocabulary needs no new weights"
    )


def train(cfg: DictConfig) -> dict:
    """Train (and validate) per ``cfg``; returns the final validation metrics."""
    log.info("%s", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("expected_duration"):
        log.info("expected duration: %s", cfg.expected_duration)
    torch.set_float32_matmul_precision("high")
    out = Path(cfg.paths.output_dir)
    # One run per folder: a second run with the same output folder is refused before anything is built.
    lock = RunLock(out) if getattr(rank_zero_only, "rank", 0) == 0 else None
    try:
        remove_stale_partials(out / "checkpoints")  # a killed write's temporary file
        last = out / "checkpoints" / "last.ckpt"
        if cfg.get("ckpt_path") and cfg.get("init_from"):
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path} (resume that run) and init_from={cfg.init_from} (start a new run "
                "from trained weights) exclude each other: give one"
            )
        if not cfg.get("ckpt_path") and cfg.get("auto_resume") and last.is_file():
            # This folder's own run was stopped (a requeued SLURM job lands in the same folder).
            log.info(
                "resuming from %s (this run folder's last checkpoint; auto_resume=false starts over)", last
            )
            cfg.ckpt_path = str(last)
        resume = init = None
        if cfg.get("ckpt_path"):
            resume = check_resume(cfg)
            folder = Path(cfg.ckpt_path).parent
            if RunLock.is_free(folder.parent):
                remove_stale_partials(folder)
        elif cfg.get("init_from"):
            init = check_init(cfg)
        return _train(cfg, resume, init)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, resume: CheckpointFile | None = None, init: CheckpointFile | None = None) -> dict:
    datamodule, module, trainer = build(cfg, resume)
    if init is not None:
        load_trainable(module.net, init)
        log.info("%s", init_report(init, cfg))
        del init  # its tensors are in the model now
    module.description = describe(cfg)
    # The resolved config and the code version, with every run.
    hparams = {"config": OmegaConf.to_container(cfg, resolve=True), "git_commit": git_commit()}
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
    before = {}
    stage = "validation before training"
    try:
        if cfg.get("validate_before_training"):
            before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
            log.info("before training: %s", format_metrics(before))
        stage = "training"
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        stage = "validation after training"
        metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    except SIGTERMException as err:
        saved = next(
            (c.saved for c in trainer.callbacks if isinstance(c, SaveOnPreemption) and c.saved), None
        )
        final = next((c.saved for c in trainer.callbacks if isinstance(c, SaveFinalState)), None)
        folder = SaveOnPreemption.checkpoint_path(trainer).parent
        raise Preempted(stage, saved or final, newest_checkpoint(folder)) from err
    if before:
        log.info("before training: %s", format_metrics(before))
    log.info("after training:  %s", format_metrics(metrics))
    if trainer.is_global_zero:  # for scripts/collect_runs.py and other tooling
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({k: float(v) for k, v in metrics.items()}, indent=1))
    return metrics


def preempted_message(stop: Preempted) -> str:
    """What is true after a SIGTERM: the file saved for it, else the newest earlier one, else none."""
    if stop.saved is not None:
        return f"stopped by SIGTERM; saved {stop.saved}: resume with ckpt_path={stop.saved}"
    if stop.newest is not None:
        return (
            f"stopped by SIGTERM during {stop.stage}, before anything could be saved; the newest checkpoint "
            f"is {stop.newest}: resume with ckpt_path={stop.newest}"
        )
    return f"stopped by SIGTERM during {stop.stage}, before any checkpoint was written: start the run again"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns val/pq (for Hydra sweepers)."""
    try:
        metrics = train(cfg)
    except Preempted as stop:
        say_error(preempted_message(stop))
        sys.exit(143)  # 128 + SIGTERM: the scheduler sees the job did not finish
    # Multiruns execute jobs in this process: free the finished job's model now (trainer <-> module
    # reference cycles would otherwise keep a 1.5B-parameter model alive into the next job).
    gc.collect()
    return float(metrics.get("val/pq", 0.0))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
