"""The config tree's location and resolvers, and start-up checks of a composed config: every value handed to a ``_target_`` against the type
annotation of the parameter it fills.

Hydra already rejects unknown keys (struct mode); a value of the wrong type (``trainer.max_steps=abc``,
``data.on_bad_sample=ignore``) would otherwise surface minutes later as a traceback deep inside
Lightning or our code. Checking against the target's own signature needs no second schema to keep
in sync: the annotations are the schema. Annotations this checker does not understand (classes,
callables, tensors) accept anything; only definite mismatches are reported.
"""

from __future__ import annotations

import inspect
import os
import secrets
import time
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from odise_pl.errors import ConfigError

_UNKNOWN = object()

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# `${wandb_offline:}`: log offline (sync later) unless the user has a W&B API key.
if not OmegaConf.has_resolver("wandb_offline"):
    OmegaConf.register_new_resolver("wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"))


def run_name() -> str:
    """The run folder's name: ``slurm-JOB[_TASK]`` under SLURM (every rank and a requeued job find
    the same folder), else the start time and a random suffix (runs started in the same second
    get folders of their own).
    """
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task else "")
    return time.strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(3)


# `${run_name:}`: hydra.run.dir / hydra.sweep.dir (conf/hydra/default.yaml), resolved once per process
if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", run_name, use_cache=True)


def _hints(target) -> dict:
    try:
        fn = target.__init__ if inspect.isclass(target) else target
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references etc.: check nothing rather than guess
        return {}


def _accepts(ann, value) -> bool:
    """Whether ``value`` (a plain YAML value) can fill a parameter annotated ``ann``."""
    if ann is typing.Any or ann is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is torch.Tensor:  # e.g. AdamW(lr: float | Tensor)
        return isinstance(value, (int, float, list)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or ann in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or ann is dict:
        return isinstance(value, dict)
    return True  # a class, callable, tensor, ...: not ours to judge


def _describe(ann) -> str:
    text = str(ann).replace("typing.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def _walk(node, path: str, errors: list[str]) -> None:
    if isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, f"{path}[{i}]", errors)
        return
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    hints = {}
    if isinstance(target, str):
        try:
            hints = _hints(get_object(target))
        except Exception:
            errors.append(
                f"{path or '<root>'}._target_={target!r} cannot be imported (a typo in the class path?)"
            )
    for key, value in node.items():
        sub = f"{path}.{key}" if path else str(key)
        if isinstance(value, (dict, list)):
            _walk(value, sub, errors)
        if key in hints and not str(key).startswith("_") and not isinstance(value, dict):
            if not _accepts(hints[key], value):
                errors.append(
                    f"{sub}={value!r} ({type(value).__name__}) but {target} expects {_describe(hints[key])}"
                )


# Allowed ranges of numeric values: key -> (low, high, is the low end excluded). The signatures say a
# value's type; these are what a type cannot say (a batch of 0, a negative learning rate).
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "seed": (0, None, False),
    "data.batch_size": (1, None, False),
    "data.val_batch_size": (1, None, False),
    "data.global_batch_size": (1, None, False),
    "data.num_workers": (0, None, False),
    "data.k_words": (0, None, False),
    "data.size_divisibility": (1, None, False),
    "data.train_transform.size": (1, None, False),
    "data.train_transform.min_scale": (0, None, True),
    "data.train_transform.max_scale": (0, None, True),
    "data.val_transform.short_edge": (1, None, False),
    "data.val_transform.max_size": (1, None, False),
    "model.optimizer.lr": (0, None, True),
    "model.optimizer.weight_decay": (0, None, False),
    "model.predictor.alpha": (0, 1, False),
    "model.predictor.beta": (0, 1, False),
    "model.predictor.object_mask_threshold": (0, 1, False),
    "model.predictor.overlap_threshold": (0, 1, False),
    "model.predictor.topk": (1, None, False),
    "callbacks.nonfinite.max_in_a_row": (1, None, False),
    "model.net.backbone_size": (64, None, False),
    "model.net.windows_per_pass": (1, None, False),
    "model.net.pyramid.out_channels": (1, None, False),
    "model.net.pixel_decoder.conv_dim": (1, None, False),
    "model.net.pixel_decoder.mask_dim": (1, None, False),
    "model.net.pixel_decoder.num_layers": (0, None, False),
    "model.net.pixel_decoder.num_heads": (1, None, False),
    "model.net.pixel_decoder.num_points": (1, None, False),
    "model.net.pixel_decoder.dim_feedforward": (1, None, False),
    "model.net.transformer_decoder.num_queries": (1, None, False),
    "model.net.transformer_decoder.num_layers": (1, None, False),
    "model.net.transformer_decoder.hidden_dim": (1, None, False),
    "model.net.transformer_decoder.num_heads": (1, None, False),
    "model.net.transformer_decoder.dim_feedforward": (1, None, False),
    "model.net.transformer_decoder.embed_dim": (1, None, False),
    "model.criterion.class_weight": (0, None, False),
    "model.criterion.mask_weight": (0, None, False),
    "model.criterion.dice_weight": (0, None, False),
    "model.criterion.no_object_weight": (0, None, False),
    "model.criterion.num_points": (1, None, False),
    "model.criterion.oversample_ratio": (1, None, False),
    "model.criterion.importance_ratio": (0, 1, False),
    "trainer.max_steps": (1, None, False),
    "trainer.val_check_interval": (0, None, True),
    "trainer.log_every_n_steps": (1, None, False),
    "trainer.accumulate_grad_batches": (1, None, False),
    "trainer.gradient_clip_val": (0, None, False),
    "trainer.num_nodes": (1, None, False),
    "callbacks.model_checkpoint.every_n_train_steps": (0, None, False),
}


def _range_text(low, high, open_low: bool) -> str:
    if high is None:
        return f"{'>' if open_low else '>='} {low}"
    return f"{'(' if open_low else '['}{low}, {high}]"


def _out_of_range(container: dict) -> list[str]:
    errors = []
    for key, (low, high, open_low) in RANGES.items():
        node = container
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            continue  # absent, null, or not a number (e.g. trainer.devices=auto): not ours to judge
        below = node <= low if open_low else node < low
        if below or (high is not None and node > high):
            errors.append(f"{key}={node} is outside the allowed range {_range_text(low, high, open_low)}")
    return errors


def check_config(cfg: DictConfig, keys: Sequence[str] | None = None) -> None:
    """Raise :class:`ConfigError` listing every value that cannot fill its ``_target_``'s parameter.

    Args:
        cfg: the composed config.
        keys: only these top-level groups (default: all).
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    errors: list[str] = []
    for key, value in container.items():
        if keys is None or key in keys:
            _walk(value, str(key), errors)
    errors += [
        e for e in _out_of_range(container) if keys is None or e.split(".", 1)[0].split("=")[0] in keys
    ]
    if errors:
        raise ConfigError(
            "config values of the wrong type or outside the allowed values:\n  "
            + "\n  ".join(errors)
            + "\nfix the override on the command line or in the experiment file"
        )
