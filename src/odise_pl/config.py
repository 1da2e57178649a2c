"""Start-up checks of a composed config: every value handed to a ``_target_`` against the type
annotation of the parameter it fills.

Hydra already rejects unknown keys (struct mode); a value of the wrong type (``trainer.max_steps=abc``,
``data.on_bad_sample=ignore``) would otherwise surface minutes later as a traceback deep inside
Lightning or our code. Checking against the target's own signature needs no second schema to keep
in sync: the annotations are the schema. Annotations this checker does not understand (classes,
callables, tensors) accept anything; only definite mismatches are reported.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping, Sequence

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from odise_pl.errors import ConfigError

_UNKNOWN = object()


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
    if errors:
        raise ConfigError(
            "config values of the wrong type or outside the allowed values:\n  "
            + "\n  ".join(errors)
            + "\nfix the override on the command line or in the experiment file"
        )
